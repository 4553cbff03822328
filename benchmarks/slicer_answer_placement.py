"""Slicer-side placement of a whole-volume answer, old vs new side by side (not a test).

Usage: python benchmarks/slicer_answer_placement.py [--slices 120] [--size 256] [--repeats 2]

Each axial slice's answer is streamed into a fresh SuggestionManager (``add_streamed_answer``, what the panel's
``take_answer`` does while a volume question runs), so one "liver" suggestion grows slice by slice. "old" finds
mask boxes with ``np.nonzero`` over the whole volume, as before ``geometry.mask_box``; "new" is the code as it is.
Runs alternate and the best of ``--repeats`` is kept; both must leave the same voxels in the suggestion.
"""

from __future__ import annotations

import argparse
import os
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
from MedSIGHTSlicerLib import geometry, suggestions  # noqa: E402
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer  # noqa: E402
from MedSIGHTSlicerLib.suggestions import SuggestionManager  # noqa: E402


def nonzero_box(mask_kji: np.ndarray):
    """The box as the code found it before mask_box: np.nonzero over the whole mask."""
    nonzero = np.nonzero(mask_kji)
    if not nonzero[0].size:
        return None
    return tuple(int(a.min()) for a in nonzero), tuple(int(a.max()) + 1 for a in nonzero)


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


def place(voxels: np.ndarray, slices: list[SliceAnswer]) -> tuple[float, np.ndarray]:
    scene = slicer.vtkMRMLScene()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    manager = SuggestionManager(scene, volume, model="demo")
    start = time.perf_counter()
    for answer in slices:
        manager.add_streamed_answer(answer, "ask-1", question="Please segment the liver.")
    took = time.perf_counter() - start
    [sid] = manager.suggestion_ids()
    return took, manager.suggestion_mask(sid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = (args.slices, args.size, args.size)
    voxels = np.zeros(shape, dtype=np.int16)
    slices = answers(shape)
    new_box = geometry.mask_box
    best = {"old": float("inf"), "new": float("inf")}
    masks = {}
    for _ in range(args.repeats):
        for name, box in (("old", nonzero_box), ("new", new_box)):
            geometry.mask_box = suggestions.mask_box = box
            try:
                took, masks[name] = place(voxels, slices)
            finally:
                geometry.mask_box = suggestions.mask_box = new_box
            best[name] = min(best[name], took)
    assert np.array_equal(masks["old"], masks["new"]), "old and new placed different voxels"
    per = {k: 1000 * v / args.slices for k, v in best.items()}
    print(f"{args.slices} streamed slices of {args.size}x{args.size}, {int(masks['new'].sum())} voxels placed "
          f"(identical): old {best['old']:.2f} s ({per['old']:.0f} ms/slice), new {best['new']:.2f} s "
          f"({per['new']:.0f} ms/slice), old/new {best['old'] / best['new']:.2f}x")


if __name__ == "__main__":
    main()
