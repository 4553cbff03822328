"""The Slicer side and the engine agree on geometry: the engine's slices of an uploaded oblique volume, sent
back as answers, land on exactly the right voxels of the Slicer volume node (Dice 1.0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from vtk.util import numpy_support  # noqa: E402

from medsight.imaging import PLANES, Volume, extract_slice, slice_count  # noqa: E402
from medsight.server.volume_store import volume_from_upload  # noqa: E402
from medsight_testing.mrml import make_volume, oblique_matrix, sphere  # noqa: E402
from MedSIGHTSlicerLib.geometry import labelmap_from_array, mask_to_ijk, volume_upload_arrays  # noqa: E402


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


def test_an_image_extent_not_starting_at_zero_keeps_its_voxels_in_place():
    """Slicer places the voxel at extent index e at IJKToRAS @ e (vtkMRMLVolumeNode::ShiftImageDataExtentToZeroStart
    keeps them there when it moves the extent to 0): the engine must see each voxel at that position, and masks and
    suggested segments must come back onto it, also when the extent starts elsewhere (a scripted or filtered image)."""
    scene = slicer.vtkMRMLScene()
    shape = (9, 11, 13)
    truth = sphere(shape)
    node = make_volume(scene, truth.astype(np.int16) * 100, oblique_matrix())
    start = np.array([2, 3, 1])  # (i, j, k) of the first voxel
    dims = np.array(shape[::-1])
    node.GetImageData().SetExtent(*[int(v) for pair in zip(start, start + dims - 1) for v in pair])

    def voxels_at(ras: np.ndarray) -> np.ndarray:
        """(k, j, i) array indices of the voxels at RAS points (N, 3), by the node's own IJKToRAS and extent."""
        ijk = (np.linalg.inv(oblique_matrix()) @ np.c_[ras, np.ones(len(ras))].T)[:3].T - start
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-6)
        kji = np.rint(ijk).astype(int)[:, ::-1]
        assert np.all((kji >= 0) & (kji < shape)), "points outside the volume"
        return kji

    array, spacing, origin, direction = volume_upload_arrays(node)
    volume = Volume(array, spacing=spacing, origin=origin, direction=np.asarray(direction).reshape(3, 3))
    seen = np.zeros(shape, bool)  # where the engine's slices show the sphere
    placed = np.zeros(shape, bool)  # where their masks land back
    for index in range(slice_count(volume, "axial")):
        slc = extract_slice(volume, "axial", index)
        rows, cols = np.nonzero(slc.pixels > 50)
        if not rows.size:
            continue
        ras = (slc.slice_to_ras @ np.stack([cols, rows, 0 * rows, 1 + 0 * rows]))[:3].T
        k, j, i = voxels_at(ras).T
        seen[k, j, i] = True
        k, j, i = mask_to_ijk(slc.slice_to_ras, slc.pixels > 50, node).T
        placed[k, j, i] = True
    assert dice(seen, truth) == 1.0
    assert dice(placed, truth) == 1.0
    segment = labelmap_from_array(truth, node)  # what a suggested segment holds
    matrix = vtk.vtkMatrix4x4()
    segment.GetImageToWorldMatrix(matrix)
    extent = np.array(segment.GetExtent()[::2])
    k, j, i = np.nonzero(numpy_support.vtk_to_numpy(segment.GetPointData().GetScalars()).reshape(shape))
    ras = (_numpy(matrix) @ np.stack([i + extent[0], j + extent[1], k + extent[2], np.ones_like(i)]))[:3].T
    in_segment = np.zeros(shape, bool)
    k, j, i = voxels_at(ras).T
    in_segment[k, j, i] = True
    assert dice(in_segment, truth) == 1.0


def _numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _load_as_slicers_dicom_plugin(scene, files):
    """A DICOM series loaded as 3D Slicer's DICOMScalarVolumePlugin loads it with its default acquisition geometry
    regularization: ITK's series grid (first to last slice over n - 1), under a grid transform whose 2 x 2 corner
    vectors per slice carry each grid slice to its acquired slice's ImagePositionPatient."""
    import pydicom
    import SimpleITK as sitk  # noqa: N813

    image = sitk.ReadImage([str(f) for f in files])
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    ijk_to_lps[:3, 3] = image.GetOrigin()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    node = make_volume(scene, sitk.GetArrayFromImage(image), lps_to_ras @ ijk_to_lps)
    slices, rows, columns = sitk.GetArrayFromImage(image).shape
    grid = vtk.vtkImageData()
    grid.SetOrigin(*node.GetOrigin())
    grid.SetDimensions(2, 2, slices)
    spacing = node.GetSpacing()
    grid.SetSpacing(spacing[0] * columns, spacing[1] * rows, spacing[2])
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(slices, 2, 2, 3)
    for k, f in enumerate(files):  # parallel slices: all four corners of a slice move alike
        acquired = lps_to_ras @ [*map(float, pydicom.dcmread(f).ImagePositionPatient), 1.0]
        vectors[k] = (acquired - lps_to_ras @ ijk_to_lps @ [0, 0, k, 1.0])[:3]
    transform = slicer.vtkOrientedGridTransform()
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    transform.SetGridDirectionMatrix(directions)
    transform.SetDisplacementGridData(grid)
    transform_node = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(transform_node)
    transform_node.SetAndObserveTransformToParent(transform)
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    return node


@pytest.mark.parametrize("table_mm", [np.delete(np.arange(12) * 2.5, 5),
                                      np.round(np.concatenate([[0], np.cumsum(np.linspace(0.6, 0.7, 59))]), 2)],
                         ids=["missing slice", "drifting step"])
def test_slicers_regularized_uneven_series_is_the_engines_regularize_spacing(tmp_path, table_mm):
    """An unevenly spaced DICOM series in Slicer sits under its acquisition regularization transform: the panel
    refuses to ask about a view of it, naming the fix (harden the transform), and once hardened it uploads as the
    volume the engine reads from the same files with regularize_spacing: the same grid, and voxels within 1 HU
    (Slicer rounds its linear interpolation into int16 by its own rule; 0 for the missing slice)."""
    import pydicom.data

    from medsight.imaging import read_volume
    from medsight_testing.dicom_series import write_uneven_series
    from MedSIGHTSlicerLib.geometry import GeometryError
    from MedSIGHTSlicerLib.views import parent_to_world

    template = sorted((Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/98892001/CT5N").iterdir())[0]
    engine = read_volume(write_uneven_series(template, tmp_path / "uneven", table_mm), regularize_spacing=True)
    scene = slicer.vtkMRMLScene()
    node = _load_as_slicers_dicom_plugin(scene, engine.source_files)
    with pytest.raises(GeometryError, match="non-linear transform: harden it first"):
        parent_to_world(node)
    node.HardenTransform()
    assert node.GetParentTransformNode() is None
    array, spacing, origin, direction = volume_upload_arrays(node)
    uploaded = volume_from_upload(array, spacing, origin, np.asarray(direction).reshape(3, 3), "CT")
    assert uploaded.same_geometry(engine)
    assert np.abs(uploaded.array.astype(float) - engine.array).max() <= 1
