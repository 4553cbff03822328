"""Memory of a large report's bootstrap intervals and time to read its data file, before and after (not a test).

Usage: python benchmarks/eval_report_scale.py [--items 88000] [--read-items 100000] [--n-boot 1000] [--out DIR]

Builds a synthetic OmniMedVQA folder (``Modality_*.json`` files, empty image files in 40 dataset folders) and
measures, each beside the code it replaced:

* the tracemalloc peak and time of the report's interval rows for the multiple-choice accuracy (`report.aggregate`:
  per modality, macro and per-sample), with the resamples drawn in blocks (now) and as one (n_boot, n) index
  matrix (before: the reference functions the tests compare against), and that both give the same rows;
* the time to read the folder (`read_omnimed`) resolving each distinct folder once (now) and with a full
  `Path.resolve` per item (before), and that both give the same image paths.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "medsight" / "evaluate"))  # the one-piece reference functions

from test_metrics import _one_piece_bootstrap_ci, _one_piece_macro_ci  # noqa: E402

from medsight.evaluate import readers, report  # noqa: E402

MODALITIES = {"CT": 0.25, "MRI": 0.2, "X-Ray": 0.15, "Ultrasound": 0.1, "Dermoscopy": 0.1, "Fundus Photography": 0.08,
              "OCT": 0.07, "Microscopy Images": 0.05}


def make_folder(root: Path, n: int) -> Path:
    """``root/QA/Modality_*.json`` with n items whose images (empty files) lie in ``root/Images/dsNN/``."""
    rng = random.Random(0)
    by: dict[str, list[dict]] = {m: [] for m in MODALITIES}
    for i in range(n):
        image = Path("Images") / f"ds{i % 40:02d}" / f"img_{i:06d}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).touch()
        m = rng.choices(list(MODALITIES), list(MODALITIES.values()))[0]
        by[m].append({"question_id": f"q{i}", "question": "What is shown?", "gt_answer": "opt a", "option_A": "opt a",
                      "option_B": "opt b", "option_C": "opt c", "option_D": "opt d", "image_path": str(image)})
    (root / "QA").mkdir(exist_ok=True)
    for m, items in by.items():
        (root / "QA" / f"Modality_{m}.json").write_text(json.dumps(items))
    return root / "QA"


def _one_piece(values, stat=None, n_boot=1000, seed=0, level=0.95):  # bootstrap_ci's signature, as report calls it
    return _one_piece_bootstrap_ci(values, n_boot, seed, level)


def _measure(fn: Callable[[], object]) -> tuple[object, int, float]:
    """fn's result, its tracemalloc peak above what was held before (bytes) and its time (s)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return out, peak, dt


class _FullResolve(readers._Resolver):
    """The readers' path resolution before: a full Path.resolve of every relative path. A subclass, so that it takes
    whatever the readers hand the resolver (a standalone class broke when `named` and `where` were added)."""

    def __call__(self, value: str, where: str = "") -> Path:
        p = Path(value)
        return super().__call__(value, where) if p.is_absolute() else (self.root / p).resolve()


def _timed_read(qa: Path, resolver: type) -> tuple[list, float]:
    """The items read with `resolver` in place, and the best time of two reads."""
    kept, readers._Resolver = readers._Resolver, resolver
    try:
        times = []
        for _ in range(2):
            t = time.perf_counter()
            items = readers.read_omnimed(qa, qa.parent)
            times.append(time.perf_counter() - t)
    finally:
        readers._Resolver = kept
    return items, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=88_000, help="items of the report (OmniMedVQA has about 88,000)")
    ap.add_argument("--read-items", type=int, default=100_000, help="items of the data folder read")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="folder for the synthetic data (default: a temporary one)")
    args = ap.parse_args()

    rng = random.Random(1)
    scores = [report.ItemScore(f"q{i}", rng.choices(list(MODALITIES), list(MODALITIES.values()))[0],
                               {"accuracy": float(rng.random() < 0.6)}) for i in range(args.items)]
    now, peak_now, t_now = _measure(lambda: report.aggregate(scores, "accuracy", args.n_boot))
    kept = report.bootstrap_ci, report.macro_bootstrap_ci
    report.bootstrap_ci, report.macro_bootstrap_ci = _one_piece, _one_piece_macro_ci
    try:
        before, peak_before, t_before = _measure(lambda: report.aggregate(scores, "accuracy", args.n_boot))
    finally:
        report.bootstrap_ci, report.macro_bootstrap_ci = kept

    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        qa = make_folder(Path(tmp), args.read_items)
        items_before, read_before = _timed_read(qa, _FullResolve)
        items_now, read_now = _timed_read(qa, readers._Resolver)
    same_paths = [it.image for it in items_before] == [it.image for it in items_now]

    print(f"{'':44s}{'before':>10s}{'now':>10s}{'before/now':>12s}")
    print(f"{f'CI rows, {args.items} items: tracemalloc peak MB':44s}{peak_before / 2**20:10.1f}"
          f"{peak_now / 2**20:10.1f}{peak_before / peak_now:12.1f}")
    print(f"{'CI rows: time s':44s}{t_before:10.2f}{t_now:10.2f}{t_before / t_now:12.2f}")
    print(f"{f'read {args.read_items} items: time s (best of 2)':44s}{read_before:10.2f}{read_now:10.2f}"
          f"{read_before / read_now:12.2f}")
    print(f"same CI rows: {now == before}; same image paths: {same_paths} ({len(items_now)} items)")


if __name__ == "__main__":
    main()
