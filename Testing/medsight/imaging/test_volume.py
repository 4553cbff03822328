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
