"""The outputs of `medsight ask`: the overlay PNG shows the pixels the model was shown."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

import medsight
from medsight.commands.ask_outputs import write_outputs
from medsight.engine import Engine, VolumeSlices, volume_window
from medsight.imaging import Volume, extract_slice, to_rgb
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
    assert np.array_equal(png, draw_overlay(seen, answers[0].regions))
