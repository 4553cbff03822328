"""The Slicer side and the engine agree on geometry: the engine's slices of an uploaded oblique volume, sent
back as answers, land on exactly the right voxels of the Slicer volume node (Dice 1.0)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from medsight.imaging import PLANES, Volume, extract_slice, slice_count  # noqa: E402
from medsight.server.volume_store import volume_from_upload  # noqa: E402
from medsight_testing.mrml import make_volume, oblique_matrix, sphere  # noqa: E402
from MedSIGHTSlicerLib.geometry import mask_to_ijk, volume_upload_arrays  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("plane", PLANES)
def test_engine_slices_land_on_the_node_voxels(plane):
    scene = slicer.vtkMRMLScene()
    shape = (9, 11, 13)
    truth = sphere(shape)
    node = make_volume(scene, truth.astype(np.int16) * 100, oblique_matrix())
    # What the module uploads, read the way the engine reads it.
    array, spacing, origin, direction = volume_upload_arrays(node)
    volume = Volume(array, spacing=spacing, origin=origin, direction=np.asarray(direction).reshape(3, 3))
    placed = np.zeros(shape, bool)
    for index in range(slice_count(volume, plane)):
        slc = extract_slice(volume, plane, index)
        mask = slc.pixels > 50  # the "answer": the sphere as seen on the engine's slice grid
        if not mask.any():
            continue
        k, j, i = mask_to_ijk(slc.slice_to_ras, mask, node).T
        placed[k, j, i] = True
    assert dice(placed, truth) == 1.0


def test_a_uint8_volume_three_voxels_wide_reaches_the_engine_as_a_volume():
    """The engine reads a uint8 upload whose last axis is 3 as one colour photo: a grey uint8 volume three voxels
    wide (i = 3) must still arrive as that volume, voxel for voxel, and its slices land back on its voxels."""
    scene = slicer.vtkMRMLScene()
    shape = (9, 11, 3)
    truth = sphere(shape, centre=(4, 5, 1), radius=2.5)
    voxels = truth.astype(np.uint8) * 200
    node = make_volume(scene, voxels, oblique_matrix(), dtype=np.uint8)
    array, spacing, origin, direction = volume_upload_arrays(node)
    volume = volume_from_upload(array, spacing, origin, np.asarray(direction).reshape(3, 3), "MR")
    assert volume.array.shape == shape
    np.testing.assert_array_equal(volume.array, voxels)
    placed = np.zeros(shape, bool)
    for index in range(slice_count(volume, "axial")):
        slc = extract_slice(volume, "axial", index)
        mask = slc.pixels > 100
        if mask.any():
            k, j, i = mask_to_ijk(slc.slice_to_ras, mask, node).T
            placed[k, j, i] = True
    assert dice(placed, truth) == 1.0
