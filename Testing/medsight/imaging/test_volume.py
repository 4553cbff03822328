"""What a Volume's array may be: grey (k, j, i) of any number type, colour (k, j, i, 3) of unsigned samples."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.imaging import ImagingError, Volume, read_dicom
from medsight.server.volume_store import volume_from_upload

GRID = (4, 8, 8)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_three_channels_of_signed_or_float_values_are_not_taken_for_colour(dtype):
    # A (k, j, i, 3) int16 or float upload was windowed as an RGB picture: no colour reader gives such values.
    channels = np.arange(np.prod(GRID) * 3).reshape(*GRID, 3).astype(dtype)
    refusal = rf"colour volume, whose samples are unsigned integers; got {np.dtype(dtype)}"
    with pytest.raises(ImagingError, match=refusal):
        volume_from_upload(channels, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    grey = volume_from_upload(channels[..., 0], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    assert grey.shape == GRID and not grey.is_rgb


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_colour_volumes_stay_colour(dtype, dicom_store):
    colour = Volume(np.zeros((*GRID, 3), dtype))
    assert colour.is_rgb and colour.shape == GRID
    # pydicom-data's colour test files, of each sample size, read as colour.
    bits = {np.uint8: "", np.uint16: "_16bit", np.uint32: "_32bit"}[dtype]
    read = read_dicom(dicom_store / f"SC_rgb{bits}.dcm")
    assert read.is_rgb and read.array.dtype == dtype


def test_spacing_below_the_finest_voxels_is_refused_naming_it():
    """Before the fix any positive spacing was taken: a subnormal one (5e-324 mm) made the voxel-to-patient matrix
    lose the grid's rotation (5e-324 * sin(0.3) rounds to 0), so masks would be placed on another grid."""
    from medsight.imaging.volume import MIN_SPACING_MM, check_geometry

    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    for tiny in (5e-324, 1e-300, MIN_SPACING_MM / 2):
        spacing = (tiny, 1.0, 1.0)
        with pytest.raises(ImagingError, match=rf"spacing must be .* got \[{tiny!r}, 1\.0, 1\.0\]"):
            check_geometry(spacing, (0.0, 0.0, 0.0), rotation, "upload")
    smallest = Volume(np.zeros((2, 3, 4), np.float32), spacing=(MIN_SPACING_MM,) * 3, direction=rotation)
    check_geometry(smallest.spacing, smallest.origin, smallest.direction, "upload")
    columns = smallest.ijk_to_lps[:3, :3] / np.asarray(smallest.spacing)
    assert np.abs(columns - rotation).max() < 1e-12  # at the bound the grid keeps its rotation
