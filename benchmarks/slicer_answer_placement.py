"""Slicer-side placement of a whole-volume answer, old vs new side by side (not a test).

Usage: python benchmarks/slicer_answer_placement.py [--slices 120] [--size 256] [--repeats 2] [--old bee4ac1]

Each axial slice's answer is streamed into a fresh SuggestionManager (``add_streamed_answers`` with that one
answer, what ``review.take_answers`` does while a volume question runs), so one "liver" suggestion grows slice by
slice. "old" is suggestions.py as it was at the git revision ``--old`` (loaded into this package, so it runs with
today's geometry), "new" is the code as it is. "together" is the code as it is, taking each request's slices at once
(``add_streamed_answers`` over ``chat_panel.chunk_bounds``: the answers of one request end together, and the panel
hands them over together). Runs alternate and the best of ``--repeats`` is kept; all must leave the same voxels in
the suggestion. The slowest slice (for "together", the slowest request) is what Slicer's main thread is blocked for
at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "support"))  # the test helpers are not an installed package
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))

import slicer  # noqa: E402

from medsight_testing.mrml import make_volume, oblique_matrix, pixel_to_ijk  # noqa: E402
from MedSIGHTSlicerLib import suggestions  # noqa: E402
from MedSIGHTSlicerLib.chat_panel import chunk_bounds  # noqa: E402
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer  # noqa: E402

SOURCE = "MedSIGHTSlicer/MedSIGHTSlicerLib/suggestions.py"


def module_at(revision: str, source: str = SOURCE):
    """``source`` (default suggestions.py) as committed at ``revision``, imported as a sibling module of today's
    package."""
    text = subprocess.run(["git", "show", f"{revision}:{source}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    name = f"MedSIGHTSlicerLib._{Path(source).stem}_{revision}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "MedSIGHTSlicerLib"
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(text, f"{revision}:{source}", "exec"), module.__dict__)  # our own committed source
    return module


def answers(shape: tuple[int, int, int]) -> list[SliceAnswer]:
    """One axial answer per slice, each with the cut of a ball ("liver") filling most of the volume."""
    k, j, i = np.indices(shape)
    centre, radius = np.array(shape) / 2, shape[1] * 0.45  # k stretched to the in-plane size: on 90% of slices
    ball = ((k - centre[0]) / shape[0] * shape[1]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2
    out = []
    for index in range(shape[0]):
        p2i = pixel_to_ijk(2, index, 0, 1, shape[::-1])
        region = Region(f"[M{index}_0]", "liver", 0, ball[index].copy(), 0.9, None)
        out.append(SliceAnswer("axial", index, "The liver is here.", [region], oblique_matrix() @ p2i))
    return out


def place(module, voxels: np.ndarray, slices: list[SliceAnswer],
          together: bool = False) -> tuple[float, float, np.ndarray]:
    """Stream every slice (``together``: each request's slices at once); the total and the slowest step's seconds,
    and the suggestion's voxels."""
    scene = slicer.vtkMRMLScene()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    manager = module.SuggestionManager(scene, volume, model="demo")
    steps = [slices[a:b] for a, b in chunk_bounds(len(slices))] if together else [[answer] for answer in slices]
    slowest = 0.0
    start = time.perf_counter()
    for step in steps:
        before = time.perf_counter()
        if hasattr(manager, "add_streamed_answers"):  # slice by slice: one single-answer request after another
            manager.add_streamed_answers(step, "ask-1", question="Please segment the liver.")
        else:  # an --old revision from before add_streamed_answers (bb3b8e5), as bee4ac1 is: one answer a call
            manager.add_streamed_answer(step[0], "ask-1", question="Please segment the liver.")
        slowest = max(slowest, time.perf_counter() - before)
    took = time.perf_counter() - start
    [sid] = manager.suggestion_ids()
    return took, slowest, manager.suggestion_mask(sid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--old", default="bee4ac1", help="git revision of the old suggestions.py")
    args = parser.parse_args()
    shape = (args.slices, args.size, args.size)
    voxels = np.zeros(shape, dtype=np.int16)
    slices = answers(shape)
    modules = {"old": module_at(args.old), "new": suggestions, "together": suggestions}
    best = dict.fromkeys(modules, (float("inf"), 0.0))
    masks = {}
    for _ in range(args.repeats):
        for name, module in modules.items():
            took, slowest, masks[name] = place(module, voxels, slices, together=name == "together")
            best[name] = min(best[name], (took, slowest))
    assert np.array_equal(masks["old"], masks["new"]), "old and new placed different voxels"
    assert np.array_equal(masks["together"], masks["new"]), "one by one and together placed different voxels"
    per = {k: 1000 * v[0] / args.slices for k, v in best.items()}
    worst = {k: 1000 * v[1] for k, v in best.items()}
    print(f"{args.slices} streamed slices of {args.size}x{args.size}, {int(masks['new'].sum())} voxels placed "
          f"(identical)")
    labels = {"old": args.old, "new": "working tree, slice by slice", "together": "working tree, a request at once"}
    for name, label in labels.items():
        print(f"  {name} ({label}): {best[name][0]:.2f} s, {per[name]:.1f} ms/slice, slowest "
              f"{'request' if name == 'together' else 'slice'} {worst[name]:.0f} ms")
    print(f"  old/new {best['old'][0] / best['new'][0]:.1f}x, new/together {best['new'][0] / best['together'][0]:.1f}x")


if __name__ == "__main__":
    main()
