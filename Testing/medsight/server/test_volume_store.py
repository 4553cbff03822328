"""The volume id hashes the voxels in place: the same id as the bytes' SHA-256, without a copy of the volume."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from medsight.imaging import ImagingError, Volume
from medsight.server.volume_store import volume_from_upload, volume_id


def test_volume_id_hashes_the_voxels_without_copying_them():
    """Before the fix the id was taken of `tobytes()`, a copy as large as the volume: 16 MiB more at the peak of
    an upload of 16 MiB (and the upload's peak went from about 1 to 2 times its size, measured on 64 MiB)."""
    volume = Volume(np.random.default_rng(0).random((16, 512, 512), dtype=np.float32), spacing=(1.0, 1.0, 2.5),
                    origin=(0.0, 0.0, 0.0), direction=np.eye(3), modality="CT")
    tracemalloc.start()
    try:
        key = volume_id(volume)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < volume.array.nbytes / 100, peak

    copy = Volume(volume.array.copy(), spacing=volume.spacing, origin=volume.origin, direction=volume.direction,
                  modality="CT")
    assert volume_id(copy) == key  # content-addressed: equal voxels and geometry, equal id
    copy.array[3, 100, 100] += 1
    assert volume_id(copy) != key


def _upload(array: np.ndarray) -> Volume:
    return volume_from_upload(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), "MR")


def test_nan_voxels_of_an_upload_read_as_the_smallest_value_as_from_a_file():
    """3D Slicer loads a NIfTI's NaN voxels (MR pipelines write them outside the brain) as they are, and its user
    cannot easily replace them: the upload was refused ("864 NaN and 0 infinite voxel values"), while the same file
    read by `medsight ask` worked. It now takes the readers' one rule (`fill_nan`) and says how many."""
    voxels = np.linspace(-5, 100, 6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    nan = np.zeros(voxels.shape, bool)
    nan[:, :2, :] = True
    sent = np.where(nan, np.float32(np.nan), voxels)
    volume = _upload(sent)
    low = voxels[~nan].min()
    assert np.array_equal(volume.array, np.where(nan, low, voxels))
    assert volume.nan_filled == f"{int(nan.sum())} NaN voxels (of {voxels.size}) read as the volume's minimum {low:g}"
    assert int(np.isnan(sent).sum()) == int(nan.sum())  # the sender's array is not changed
    # Not the id of the filled voxels uploaded as such: each id's volume says truly whether NaN were filled.
    assert volume_id(volume) != volume_id(_upload(np.where(nan, low, voxels)))
    assert _upload(voxels).nan_filled is None


@pytest.mark.parametrize(("value", "message"), [(np.inf, "1 infinite voxel values: replace them"),
                                                 (np.nan, "no voxel holds a number")])
def test_infinite_or_nan_only_uploads_are_still_refused(value, message):
    voxels = np.zeros((3, 4, 5), np.float32)
    voxels[1, 2, 3] = value
    if np.isnan(value):
        voxels[:] = value
    else:
        voxels[0, 0, 0] = np.nan
    with pytest.raises(ImagingError, match=message):
        _upload(voxels)
