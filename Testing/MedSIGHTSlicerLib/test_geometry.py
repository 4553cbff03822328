"""geometry.py against real MRML nodes: upload arrays, and slice masks landing exactly on an oblique volume's voxels."""

from __future__ import annotations

import re

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from medsight_testing.mrml import make_volume, oblique_matrix, pixel_to_ijk, sphere  # noqa: E402
from MedSIGHTSlicerLib.geometry import (  # noqa: E402
    GeometryError,
    ijk_to_ras,
    labelmap_from_array,
    mask_box,
    mask_to_ijk,
    nodes_by_class,
    segment_array,
    shape_text,
    volume_upload_arrays,
)

SHAPE_KJI = (9, 11, 13)
# (plane axis, column axis, row axis) with axes 0=i, 1=j, 2=k; flips exercise reversed pixel grids.
PLANES = {
    "axial": (2, 0, 1, False, False),
    "coronal": (1, 0, 2, False, True),
    "sagittal": (0, 1, 2, True, True),
}


def slice_geometry(plane: str, index: int, shape_kji=SHAPE_KJI):
    """(pixel_to_ijk, rows, cols) of an array-slab slice, in the engine's (col, row) convention."""
    normal, col, row, flip_cols, flip_rows = PLANES[plane]
    shape_ijk = shape_kji[::-1]
    p2i = pixel_to_ijk(normal, index, col, row, shape_ijk, flip_cols, flip_rows)
    return p2i, shape_ijk[row], shape_ijk[col]


def slice_mask(array_kji: np.ndarray, p2i: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The values of a (k, j, i) array on a slice's pixel grid, computed pixel by pixel through ``p2i``."""
    r, c = np.mgrid[0:rows, 0:cols]
    pts = np.stack([c.ravel(), r.ravel(), np.zeros(r.size), np.ones(r.size)])
    i, j, k = np.rint(p2i @ pts)[:3].astype(int)
    return array_kji[k, j, i].reshape(rows, cols)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def volume(scene):
    rng = np.random.default_rng(0)
    return make_volume(scene, rng.integers(-1000, 1000, SHAPE_KJI).astype(np.int16), oblique_matrix())


def test_upload_arrays_round_trip_geometry(volume):
    array, spacing, origin, direction = volume_upload_arrays(volume)
    assert array.shape == SHAPE_KJI and array.dtype == np.int16
    np.testing.assert_allclose(spacing, [0.8, 1.1, 2.5])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    rebuilt = np.eye(4)
    rebuilt[:3, :3] = lps_to_ras @ np.reshape(direction, (3, 3)) @ np.diag(spacing)
    rebuilt[:3, 3] = lps_to_ras @ np.asarray(origin)
    np.testing.assert_allclose(rebuilt, oblique_matrix(), atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(volume), oblique_matrix(), atol=1e-12)


def test_upload_array_is_a_copy(volume):
    array, *_ = volume_upload_arrays(volume)
    array[:] = 0
    again, *_ = volume_upload_arrays(volume)
    assert again.any()


def test_sending_a_node_holds_one_copy_of_its_voxels_and_sends_them_exactly(scene):
    """A CT is hundreds of megabytes and the node already holds it: the Slicer side of an upload (these arrays, then
    the client) holds one copy beside it, the snapshot above, and sends exactly the node's voxels (np.save into a
    BytesIO made the peak 3.0 extra volumes here)."""
    import hashlib
    import io
    import tracemalloc

    from vtk.util import numpy_support

    from medsight_testing.body_sink import body_sink
    from MedSIGHTSlicerLib.client import MedSIGHTClient

    shape = (16, 256, 512)
    node = make_volume(scene, np.indices(shape).sum(axis=0).astype(np.int16) - 500, oblique_matrix())
    voxels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(shape)
    saved = io.BytesIO()
    np.save(saved, voxels, allow_pickle=False)
    expected = hashlib.sha256(saved.getbuffer()).hexdigest()
    del saved
    reply = {"volume_id": "ab" * 32, "shape": list(shape), "modality": "CT", "slices": {"axial": 16}, "bytes": 1}
    with body_sink(reply) as sink:
        client = MedSIGHTClient(sink.url)
        tracemalloc.start()
        try:
            client.upload_volume(*volume_upload_arrays(node), modality="CT")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert sink.received[-1].sha256 == expected
    assert peak / voxels.nbytes < 1.1



def test_infinite_voxels_are_refused_naming_the_volume_and_nan_voxels_are_sent_as_they_are(scene):
    """Infinite voxels (a float volume from a division, a failed registration) cannot be windowed: refused before the
    upload with the volume's name and count, not after sending the whole volume to the engine. NaN voxels (MR
    pipelines write them outside the brain, and Slicer loads them as they are) were refused the same way, which a
    Slicer user cannot easily fix: they are sent as they are, for the engine to read as its smallest value."""
    voxels = np.zeros(SHAPE_KJI, np.float32)
    voxels.reshape(-1)[[0, 5, 9]] = np.nan
    voxels.reshape(-1)[[2, 7]] = [np.inf, -np.inf]
    node = make_volume(scene, voxels, oblique_matrix(), name="Ratio map", dtype=np.float32)
    with pytest.raises(GeometryError, match=r"'Ratio map' has 2 infinite voxels, which no window can show: replace "):
        volume_upload_arrays(node)
    voxels.reshape(-1)[[2, 7]] = 1.5  # finite but for the NaN: sent, NaN and all
    with_nan = make_volume(scene, voxels, oblique_matrix(), name="MR with NaN", dtype=np.float32)
    sent = volume_upload_arrays(with_nan)[0]
    np.testing.assert_array_equal(sent, voxels)  # equal_nan: the NaN stay where they were
    assert int(np.isnan(sent).sum()) == 3
    nan_only = make_volume(scene, np.full(SHAPE_KJI, np.nan, np.float32), oblique_matrix(), name="Empty map",
                           dtype=np.float32)
    with pytest.raises(GeometryError, match=rf"'Empty map' holds no number: all {int(np.prod(SHAPE_KJI))} voxels "):
        volume_upload_arrays(nan_only)


def test_sheared_voxel_axes_are_refused_naming_the_volume(scene):
    """Hardening an affine transform with shear (or a gantry tilt) leaves a volume whose IJKToRAS axes are not at
    right angles. The engine refuses such a grid after the whole upload, with a bare matrix: it is refused before,
    naming the volume and what to do."""
    matrix = oblique_matrix()
    matrix[:3, 1] += 0.2 * matrix[:3, 0]  # the j axis leans towards the i axis
    node = make_volume(scene, np.zeros(SHAPE_KJI, np.int16), matrix, name="Registered")
    with pytest.raises(GeometryError, match=r"'Registered' has sheared voxel axes.*resample"):
        volume_upload_arrays(node)
    matrix[0, 0] = np.nan  # a broken file's matrix: not called sheared
    broken = make_volume(scene, np.zeros(SHAPE_KJI, np.int16), matrix, name="Broken")
    with pytest.raises(GeometryError, match=r"'Broken' has a degenerate IJKToRAS matrix"):
        volume_upload_arrays(broken)


@pytest.mark.parametrize("plane", list(PLANES))
def test_masks_land_on_the_sphere_voxels(volume, plane):
    ball = sphere()
    normal = PLANES[plane][0]
    found = np.zeros(SHAPE_KJI, dtype=bool)
    for index in range(SHAPE_KJI[::-1][normal]):
        p2i, rows, cols = slice_geometry(plane, index)
        mask = slice_mask(ball, p2i, rows, cols)
        voxels = mask_to_ijk(oblique_matrix() @ p2i, mask, volume)
        assert voxels.shape == (int(mask.sum()), 3)
        found[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = True
    np.testing.assert_array_equal(found, ball)


def test_off_grid_slice_is_refused(volume):
    p2i, rows, cols = slice_geometry("axial", 4)
    shifted = oblique_matrix() @ p2i
    shifted[:3, 3] += oblique_matrix()[:3, 2] * 0.5  # half a slice along k
    with pytest.raises(GeometryError, match="not on the grid"):
        mask_to_ijk(shifted, np.ones((rows, cols), bool), volume)


def test_outside_volume_is_refused(volume):
    p2i, rows, cols = slice_geometry("axial", 4)
    with pytest.raises(GeometryError, match="outside"):
        mask_to_ijk(oblique_matrix() @ p2i, np.ones((rows + 2, cols), bool), volume)


def test_empty_mask_and_bad_shapes(volume):
    p2i, rows, cols = slice_geometry("axial", 0)
    assert mask_to_ijk(oblique_matrix() @ p2i, np.zeros((rows, cols), bool), volume).shape == (0, 3)
    with pytest.raises(GeometryError):
        mask_to_ijk(np.eye(3), np.zeros((rows, cols), bool), volume)
    with pytest.raises(GeometryError):
        mask_to_ijk(oblique_matrix() @ p2i, np.zeros((2, rows, cols), bool), volume)


def test_segment_array_round_trip(scene, volume):
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment = slicer.vtkSegment()
    segment.SetName("ball")
    labelmap = labelmap_from_array(sphere(), volume)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    assert node.GetSegmentation().AddSegment(segment, "ball")
    np.testing.assert_array_equal(segment_array(node, "ball", volume), sphere())
    with pytest.raises(GeometryError, match=r"\(2, 2, 2\) is not the \(k, j, i\) shape .* of the volume's grid"):
        labelmap_from_array(np.zeros((2, 2, 2)), volume)
    # On a grid given by the caller (e.g. a segment's own lattice) the error names that grid, not the volume's.
    grid = (ijk_to_ras(volume), tuple(2 * n for n in SHAPE_KJI))
    with pytest.raises(GeometryError, match=re.escape(f"{SHAPE_KJI} is not the (k, j, i) shape {grid[1]} of the grid")):
        labelmap_from_array(sphere(), volume, grid=grid)


def test_shape_text_reads_i_by_j_by_k():
    k, j, i = SHAPE_KJI
    assert shape_text(SHAPE_KJI) == f"{i}x{j}x{k}"
    assert shape_text(()) == "no"  # a volume without image data


def test_nodes_by_class_keeps_no_node_alive(scene, volume):
    """The scene's collection is released: listing nodes leaves every node's reference count as it was, so a node
    removed from the scene later is freed (with its voxels)."""
    nodes = [scene.AddNewNodeByClass("vtkMRMLSegmentationNode") for _ in range(3)]
    counts = [node.GetReferenceCount() for node in nodes]
    for _ in range(len(nodes)):
        found = nodes_by_class(scene, "vtkMRMLSegmentationNode")
    assert found == nodes
    assert nodes_by_class(scene, "vtkMRMLScalarVolumeNode") == [volume]
    del found
    assert [node.GetReferenceCount() for node in nodes] == counts


def test_mask_box_is_the_box_around_every_set_voxel_as_nonzero_finds_it():
    """mask_box (found axis by axis on a shrinking slab, for speed) gives the box np.nonzero's extremes give: one
    voxel at each corner, one streamed slice of a CT-like volume, a uint8 0/1 mask, and None for an empty mask."""
    from medsight_testing.review_scene import ct_voxels

    voxels = ct_voxels()
    masks = [voxels > 100, (voxels > 100) & (np.arange(voxels.shape[0]) == voxels.shape[0] // 2)[:, None, None],
             (voxels == -1000).astype(np.uint8)]
    for corner in np.ndindex(2, 2, 2):
        single = np.zeros(voxels.shape, dtype=bool)
        single[tuple(c * (n - 1) for c, n in zip(corner, voxels.shape))] = True
        masks.append(single)
    for mask in masks:
        nonzero = np.nonzero(mask)
        expected = tuple(int(a.min()) for a in nonzero), tuple(int(a.max()) + 1 for a in nonzero)
        assert mask_box(mask) == expected
        cut = mask[tuple(slice(lo, hi) for lo, hi in zip(*mask_box(mask)))]
        assert cut.sum() == mask.sum() and all(cut.any(axis=a).any() for a in range(3))
    assert mask_box(np.zeros(voxels.shape, dtype=bool)) is None
