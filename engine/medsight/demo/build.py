"""Build the demo data set: stage-1/2 BiomedParse-style folders and stage-3-5 LVLM JSON, split by subject."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .catalog import CLASS_IDS, SOURCES, SPLITS, STRUCTURES, Source
from .qa import make_items, mask_id
from .samples import Sample2D, brain_samples, ct_samples, cxr_samples
from .sources import load_mni

_MAKERS = {"ct_abdomen": ct_samples, "mri_brain": brain_samples, "cxr": cxr_samples}


@dataclass(frozen=True)
class DemoSize:
    """Subjects per split and slices per subject, per source; ``image_size`` is the square side in pixels."""

    subjects: dict[str, dict[str, int]]
    slices_per_subject: dict[str, int]
    image_size: int = 112


SIZES: dict[str, DemoSize] = {
    # ~1100 / 100 / 150 2D samples.
    "default": DemoSize(
        {"ct_abdomen": {"train": 60, "val": 5, "test": 8}, "mri_brain": {"train": 60, "val": 5, "test": 8},
         "cxr": {"train": 240, "val": 20, "test": 32}},
        {"ct_abdomen": 8, "mri_brain": 8, "cxr": 1},
    ),
    # Three times the default's training subjects (~3500 train samples), the same val/test subjects: more anatomy
    # and lesions for the demo model to generalise from, at ~2 min to build.
    "large": DemoSize(
        {"ct_abdomen": {"train": 180, "val": 5, "test": 8}, "mri_brain": {"train": 180, "val": 5, "test": 8},
         "cxr": {"train": 720, "val": 20, "test": 32}},
        {"ct_abdomen": 8, "mri_brain": 8, "cxr": 1},
    ),
    # <= 30 samples, a few seconds: for tests.
    "tiny": DemoSize(
        {"ct_abdomen": {"train": 2, "val": 1, "test": 1}, "mri_brain": {"train": 2, "val": 1, "test": 1},
         "cxr": {"train": 2, "val": 1, "test": 1}},
        {"ct_abdomen": 3, "mri_brain": 3, "cxr": 1},
        image_size=64,
    ),
}


@dataclass
class DemoDataset:
    """Paths and statistics of a built demo data set (all paths absolute)."""

    root: Path
    meta: dict[str, Path]  # split -> BiomedParse meta JSON
    stage1_json: dict[str, dict[str, Path]]  # source -> split -> COCO-refer JSON
    lvlm_json: dict[str, Path]  # split -> LLaVA-style JSON (placeholders, see qa.fill_codes)
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0


def _subject_rng(seed: int, source: Source, split: str, n: int) -> np.random.Generator:
    # Keyed by (source, split, subject) so a subject's data does not depend on how many others are built.
    return np.random.default_rng([seed, source.modality_label, SPLITS.index(split), n])


def generate_samples(size: str | DemoSize = "default", seed: int = 0) -> list[Sample2D]:
    """All 2D samples in memory, ordered by source, split, subject, slice."""
    spec = SIZES[size] if isinstance(size, str) else size
    out = []
    template = None  # the MNI152 template, loaded once for all brain subjects
    for source in SOURCES:
        for split in SPLITS:
            for n in range(spec.subjects[source.key][split]):
                subject = f"{source.key}_{split}{n:03d}"
                rng = _subject_rng(seed, source, split, n)
                extra = {}
                if source.key == "mri_brain":
                    template = template or load_mni(2)
                    extra["template"] = template
                smp, _ = _MAKERS[source.key](rng, subject, split, spec.slices_per_subject[source.key], spec.image_size,
                                             **extra)
                out += smp
    return out


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")  # PIL writes no timestamp: same array -> same bytes


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def write_dataset(samples: list[Sample2D], out_dir: str | Path, seed: int = 0) -> DemoDataset:
    """Write images, masks, per-source COCO-refer JSON, BiomedParse meta JSON and LVLM JSON under ``out_dir``.

    Every path stored in a JSON is relative (to ``out_dir`` for LVLM, to the meta file's folder for stage 1) so
    the data can move and two builds with the same seed are byte-identical.
    """
    root = Path(out_dir).resolve()
    categories = [{"id": i, "name": n} for i, n in enumerate(STRUCTURES)]
    coco = {s.key: {sp: {"images": [], "annotations": [], "categories": categories} for sp in SPLITS} for s in SOURCES}
    lvlm: dict[str, list[dict]] = {sp: [] for sp in SPLITS}
    for s in SOURCES:
        (root / s.key / "images").mkdir(parents=True, exist_ok=True)
        (root / s.key / "masks").mkdir(parents=True, exist_ok=True)
    (root / "lvlm").mkdir(parents=True, exist_ok=True)

    for image_id, smp in enumerate(samples):
        key = smp.source.key
        file_name = f"{smp.sample_id}.png"
        _write_png(root / key / "images" / file_name, smp.image)
        doc = coco[key][smp.split]
        size = smp.image.shape[0]
        doc["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                              "subject": smp.subject, "modality_label": smp.modality_label, **smp.info})
        mask_paths = {}
        for name, m in smp.masks.items():
            mid = mask_id(smp.sample_id, name)
            _write_png(root / key / "masks" / f"{mid}.png", (m * 255).astype(np.uint8))
            mask_paths[mid] = f"{key}/masks/{mid}.png"
            doc["annotations"].append({
                "id": len(doc["annotations"]), "image_id": image_id, "file_name": file_name,
                "mask_file": f"{mid}.png", "mask_id": mid, "bbox": _bbox(m), "area": int(m.sum()),
                "category_id": CLASS_IDS[name],
                "sentences": [{"sent": name}, {"sent": f"{name} in {smp.source.modality_name}"}],
            })
        rng = np.random.default_rng([seed, 7, image_id])
        lvlm[smp.split] += make_items(smp, f"{key}/images/{file_name}", mask_paths, rng)

    stage1: dict[str, dict[str, Path]] = {s.key: {} for s in SOURCES}
    for s in SOURCES:
        for sp in SPLITS:
            stage1[s.key][sp] = root / s.key / f"{sp}.json"
            _write_json(stage1[s.key][sp], coco[s.key][sp])
    meta, lvlm_paths = {}, {}
    for sp in SPLITS:
        meta[sp] = root / f"biomedparse_meta_{sp}.json"
        _write_json(meta[sp], {
            "names": [s.key for s in SOURCES],
            "roots": [f"{s.key}/images" for s in SOURCES],
            "mask_roots": [f"{s.key}/masks" for s in SOURCES],
            "json_paths": [f"{s.key}/{sp}.json" for s in SOURCES],
            "modality_labels": [s.modality_label for s in SOURCES],
            "modality_names": [s.modality_name for s in SOURCES],
        })
        lvlm_paths[sp] = root / "lvlm" / f"{sp}.json"
        _write_json(lvlm_paths[sp], lvlm[sp])
    counts = statistics(samples, lvlm)
    _write_json(root / "summary.json", {"seed": seed, "structures": list(STRUCTURES), **counts})
    return DemoDataset(root, meta, stage1, lvlm_paths, counts)


def statistics(samples: list[Sample2D], lvlm: dict[str, list[dict]] | None = None) -> dict:
    """Counts per split and source: images, subjects, masks per structure, LVLM items and code mentions."""
    stats: dict = {}
    for sp in SPLITS:
        per = {}
        for s in SOURCES:
            sel = [x for x in samples if x.split == sp and x.source.key == s.key]
            per[s.key] = {
                "images": len(sel),
                "subjects": len({x.subject for x in sel}),
                "masks": dict(Counter(n for x in sel for n in x.masks)),
            }
        stats[sp] = {"images": sum(v["images"] for v in per.values()), "sources": per}
        if lvlm is not None:
            stats[sp]["lvlm_items"] = len(lvlm[sp])
            stats[sp]["code_mentions"] = sum(len(it["mask_orders"]) for it in lvlm[sp])
    return stats


def build_demo_data(out_dir: str | Path, size: str | DemoSize = "default", seed: int = 0) -> DemoDataset:
    """Generate and write the whole demo data set; returns its paths and statistics."""
    t0 = time.perf_counter()
    ds = write_dataset(generate_samples(size, seed), out_dir, seed)
    ds.seconds = time.perf_counter() - t0
    return ds


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m medsight.demo OUT_DIR [--size default|tiny] [--seed N]``."""
    p = argparse.ArgumentParser(prog="medsight.demo", description="Build the MedSIGHT demo training data.")
    p.add_argument("out_dir")
    p.add_argument("--size", default="default", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ds = build_demo_data(args.out_dir, args.size, args.seed)
    print(json.dumps({"root": str(ds.root), "seconds": round(ds.seconds, 2), **ds.counts}, indent=1))
    return 0
