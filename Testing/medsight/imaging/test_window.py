"""Windowing to 8-bit RGB."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medsight.imaging import CT_PRESETS, ImagingError, Window, extract_slice, read_volume, to_rgb
from medsight.imaging.window import explicit_window, preset_window, robust_window


def test_ct_presets_on_real_ct(pydicom_files):
    vol = read_volume(pydicom_files / "CT_small.dcm")
    hu = extract_slice(vol, "axial", 0).pixels
    for name, w in CT_PRESETS.items():
        rgb = to_rgb(hu, "CT", preset=name)
        assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 2])
        expect = np.clip(np.rint((hu - w.low) * 255 / w.width), 0, 255)
        assert np.abs(rgb[..., 0].astype(int) - expect).max() <= 1, name
    assert np.array_equal(to_rgb(hu, "CT"), to_rgb(hu, "CT", preset="abdomen"))
    assert (to_rgb(hu, "CT", preset="lung") == 0).sum() < (to_rgb(hu, "CT", preset="brain") == 0).sum()


def test_exact_window_values():
    v = np.array([[-1000, 40, 240, 2000]], dtype=np.int16)
    rgb = to_rgb(v, "CT", center=40, width=400)
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 255]
    assert Window(40, 400).low == -160


def test_mr_robust_percentiles(pydicom_files):
    mr = read_volume(pydicom_files / "MR_small.dcm").array[0]
    rgb = to_rgb(mr, "MR")
    lo, hi = np.percentile(mr, [0.5, 99.5])
    assert rgb[mr <= lo].max() == 0 and rgb[mr >= hi].min() == 255
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)


def test_rgb_passthrough_and_errors(dicom_store):
    us = read_volume(dicom_store / "US1_UNCR.dcm").array[0]
    assert np.array_equal(to_rgb(us, "US"), us)
    with pytest.raises(ImagingError, match="needs CT"):
        to_rgb(np.zeros((4, 4)), "MR", preset="lung")
    with pytest.raises(ImagingError, match="unknown window preset 'spine'"):
        to_rgb(np.zeros((4, 4)), "CT", preset="spine")
    with pytest.raises(ImagingError, match="both window center and width"):
        to_rgb(np.zeros((4, 4)), "CT", center=40)


@pytest.mark.parametrize(("center", "width", "words"), [
    (float("nan"), 400, "finite"), (40, float("inf"), "finite"), (1e300, 1e300, "beyond"),
    (-1e35, 10, "beyond"),
])
def test_explicit_window_must_be_finite(center, width, words):
    """NaN or infinite bounds used to make every pixel the same grey, silently."""
    with pytest.raises(ImagingError, match=words):
        to_rgb(np.zeros((4, 4)), "CT", center=center, width=width)


@pytest.mark.parametrize(("center", "width"), [(40, 1e-308), (0, 1e-40), (1e29, 1e-3), (40, 1e-6)])
def test_a_window_too_narrow_for_float32_display_is_refused(center, width):
    """Before the fix these were accepted: the float32 scale 255 / width overflowed or the ends rounded to one value,
    so a voxel at the window's low end became inf * 0 = NaN (numpy warnings, then NaN cast to a grey)."""
    with pytest.raises(ImagingError, match=f"window width {width:g} is too narrow"):
        explicit_window(center, width)
    step = float(np.spacing(np.float32(40)))  # the narrowest windows at 40 whose ends differ in float32 still work
    pixels = np.array([[40 - 2 * step, 40, 40 + 2 * step]])
    assert to_rgb(pixels, "CT", center=40, width=2 * step)[0, :, 0].tolist() == [0, 128, 255]


def test_an_image_whose_range_is_too_narrow_to_display_is_one_grey_like_a_constant_one():
    """Its percentile window (width 1e-40) overflowed the float32 scale: numpy warnings and NaN grey values before
    the explicit-window check, an ImagingError for an ask with the automatic window after it."""
    values = np.linspace(0, 1e-40, 16).reshape(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(to_rgb(values, "MR"), to_rgb(np.zeros_like(values), "MR"))


@pytest.mark.parametrize("value", [0.0, -3e7, 1e8, 1e29])
def test_a_constant_image_of_any_displayable_value_is_one_grey(value):
    """A constant image beyond 2**24 (1.6e7) was refused as "too narrow": its window of width 1 has ends that round
    to one float32 value there."""
    values = np.full((4, 4), value, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(to_rgb(values, "MR"), to_rgb(np.zeros_like(values), "MR"))


def test_the_window_of_a_constant_image_beyond_float32_is_refused_without_numpy_warnings():
    """The engine's check (`engine.volume_window`): the percentile window, then the explicit-window rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window = robust_window(np.full((4, 4), 1e300))
        with pytest.raises(ImagingError, match="beyond"):
            explicit_window(window.center, window.width)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_voxels_far_outside_the_window_are_black_or_white_without_warnings(dtype):
    """Before the fix they were, but numpy printed "overflow encountered in cast/multiply" on the engine's terminal
    (a float64 voxel beyond float32, a float32 one of 3e38 at width 1)."""
    top = float(np.finfo(dtype).max) / 2
    values = np.array([[-top, 0, top]], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_rgb(values, "MR", center=0, width=1)[0, :, 0].tolist() == [0, 128, 255]


def test_preset_window_is_the_one_rule_for_names_and_modalities():
    assert preset_window("Lung", "ct") == CT_PRESETS["lung"]
    assert preset_window("auto", "MR") is None
    with pytest.raises(ImagingError, match="unknown window preset 'lungs'"):
        preset_window("lungs", "CT")
    with pytest.raises(ImagingError, match="needs CT, not MR"):
        preset_window("bone", "MR")
