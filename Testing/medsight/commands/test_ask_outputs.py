"""The outputs of `medsight ask`: the overlay PNG shows the pixels the model was shown."""

from __future__ import annotations

import argparse

import numpy as np
import pydicom.data
import torch
from PIL import Image
from scipy import ndimage

import medsight
from medsight.answer import Answer, Region
from medsight.commands.ask_outputs import _finding_segments, write_outputs
from medsight.engine import Engine, VolumeSlices, volume_window
from medsight.imaging import Volume, extract_slice, read_volume, to_rgb
from medsight.imaging.export_nrrd import read_seg_nrrd
from medsight.model.generation import GenerationOptions
from medsight.overlay import draw_overlay


def test_overlay_of_a_16_bit_colour_volume_shows_the_pixels_the_model_saw(tmp_path):
    """The overlay worked its window out again, from the whole volume, where the engine windows a colour slice of
    more than 8 bits on its own: a dim slice beside a bright one was drawn near black (overlay max 4 where the model
    saw up to 255)."""
    ramp = np.linspace(0, 1, 24 * 32).reshape(24, 32)
    grey = np.stack([ramp * 1000, ramp * 60000])  # a dim slice beside a bright one
    volume = Volume(np.repeat(grey[..., None], 3, -1).astype(np.uint16), modality="OT")
    window = volume_window(volume, None)
    engine = Engine(medsight.load_model("tiny", device="cpu", dtype=torch.float32))
    answers = engine.ask(VolumeSlices(volume, "axial", [0], window), "What is shown?",
                         GenerationOptions(max_new_tokens=6)).answers
    overlay = tmp_path / "ov.png"
    args = argparse.Namespace(out=None, overlay=str(overlay))
    assert write_outputs(args, volume, answers, window) == ({"out": None, "overlay": str(overlay)}, [])
    seen = to_rgb(extract_slice(volume, "axial", 0).pixels)  # the engine's window of a colour slice: its own
    png = np.asarray(Image.open(overlay).convert("RGB"))
    assert seen.max() == 255 and png.shape == seen.shape
    colours = {id(r): segment.color for segment, pairs in _finding_segments(answers) for _, r in pairs}
    assert np.array_equal(png, draw_overlay(seen, answers[0].regions, [colours[id(r)] for r in answers[0].regions]))


def test_overlay_draws_each_region_in_its_segment_colour_of_the_out_file(tmp_path):
    """--out puts the regions of one label into one segment of one colour; the overlay coloured each region on its
    own, each avoiding the colours before it, so a second "Liver" region was drawn in another colour (102, 114, 242)
    than the file's "Liver" segment (140, 204, 51). Now every region's border has its segment's colour."""
    volume = read_volume(pydicom.data.get_testdata_file("CT_small.dcm"))
    window = volume_window(volume, None)
    geometry = extract_slice(volume, "axial", 0)
    rows, cols = geometry.pixels.shape[:2]
    side = min(rows, cols) // 4

    def region(code: str, label: str, row: int, col: int) -> Region:
        mask = np.zeros((rows, cols), bool)
        mask[row:row + side, col:col + side] = True
        return Region(code, label, 0, torch.zeros(side, side), mask, 1.0, (row, col, row + side - 1, col + side - 1))

    regions = [region("[M0_1]", "Liver", 0, 0), region("[M0_2]", "Kidney", 0, cols - side),
               region("[M0_3]", "Liver", rows - side, cols // 2)]
    answers = [Answer("the liver, a kidney and the liver", regions, slice=geometry)]
    args = argparse.Namespace(out=str(tmp_path / "a.seg.nrrd"), overlay=str(tmp_path / "a.png"))
    assert write_outputs(args, volume, answers, window) == ({"out": args.out, "overlay": args.overlay}, [])
    segments = {s.name: s for s in read_seg_nrrd(args.out).segments}
    assert sorted(segments) == ["Kidney", "Liver"]
    png = np.asarray(Image.open(args.overlay).convert("RGB"))
    for r in regions:
        border = r.mask & ~ndimage.binary_erosion(r.mask)
        colours = np.unique(png[border], axis=0)
        expected = np.rint(255 * np.array(segments[r.label].color))
        assert colours.tolist() == [expected.tolist()], r.label
