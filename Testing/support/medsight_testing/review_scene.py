"""A CT-like volume, user segments in one shared labelmap layer, and labelmap checks for review tests (slicer-core)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .mrml import pixel_to_ijk

if TYPE_CHECKING:
    from MedSIGHTSlicerLib.protocol import SliceAnswer


def ct_voxels() -> np.ndarray:
    """A bright disc (an "organ") in soft tissue on 7 slices of 32 x 40 voxels, air corners: CT-like int16.

    (On this grid the tiny random-weight engine answers with several non-empty regions per slice.)"""
    k, j, i = np.mgrid[0:7, 0:32, 0:40]
    voxels = np.where((j - 16) ** 2 + (i - 20) ** 2 < 64, 180.0, 40.0) + 3.0 * k
    voxels[:, :3, :3] = -1000.0
    return voxels.astype(np.int16)


def ct_scene():
    """A scene holding the ``ct_voxels()`` volume "CT" on an oblique grid: (scene, volume, voxels)."""
    import slicer

    from .mrml import make_volume, oblique_matrix

    scene = slicer.vtkMRMLScene()
    voxels = ct_voxels()
    return scene, make_volume(scene, voxels, oblique_matrix(), name="CT"), voxels


def organ_masks(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A "liver" and a "kidney" block the user drew on a ``ct_voxels()`` grid, apart from each other."""
    liver = np.zeros(shape, dtype=bool)
    liver[1:5, 4:10, 4:12] = True
    kidney = np.zeros(shape, dtype=bool)
    kidney[1:5, 14:20, 16:24] = True
    return liver, kidney


def volume_shape(volume) -> tuple[int, int, int]:
    i, j, k = volume.GetImageData().GetDimensions()
    return (k, j, i)


def segment_ids(node) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def add_shared_user_segments(node, volume, masks: dict[str, np.ndarray]) -> list[str]:
    """User segments in ONE shared labelmap layer (one image, a label value each), as the Segment Editor makes them."""
    import slicer
    from vtk.util import numpy_support

    from MedSIGHTSlicerLib.geometry import labelmap_from_array

    labels = np.zeros(volume_shape(volume), dtype=np.uint8)
    for value, mask in enumerate(masks.values(), start=1):
        labels[mask] = value
    layer = labelmap_from_array(labels > 0, volume)
    numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())[:] = labels.reshape(-1)
    layer.Modified()
    ids = []
    for value, name in enumerate(masks, start=1):
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetLabelValue(value)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), layer)
        segment_id = node.GetSegmentation().GenerateUniqueSegmentID("user")
        assert node.GetSegmentation().AddSegment(segment, segment_id)
        ids.append(segment_id)
    sharing: list[str] = []
    node.GetSegmentation().GetSegmentIDsSharingBinaryLabelmapRepresentation(ids[0], sharing, False)
    assert sharing == ids[1:]
    return ids


def user_segmentation(scene, volume, name: str = "CT segmentation"):
    import slicer

    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.CreateDefaultDisplayNodes()
    return node


def labelmap(masks: dict[str, np.ndarray], ids, shape) -> np.ndarray:
    """One label array: segment n of ``ids`` has label n + 1 (later segments win where they overlap)."""
    out = np.zeros(shape, dtype=np.int16)
    for n, segment_id in enumerate(ids):
        out[masks[segment_id]] = n + 1
    return out


def check_segments(node, volume, expected: dict[str, np.ndarray]) -> None:
    """``node`` holds exactly ``expected`` (segment id -> mask), segment by segment and as one labelmap."""
    from MedSIGHTSlicerLib.geometry import segment_array

    ids = segment_ids(node)
    assert sorted(ids) == sorted(expected)
    got = {segment_id: segment_array(node, segment_id, volume) for segment_id in ids}
    for segment_id, mask in expected.items():
        assert np.array_equal(got[segment_id], mask), f"{segment_id}: {int((got[segment_id] != mask).sum())} differ"
    shape = volume_shape(volume)
    np.testing.assert_array_equal(labelmap(got, ids, shape), labelmap(expected, ids, shape))


def paint(node, segment_id: str, stroke: np.ndarray, volume) -> None:
    """Add ``stroke``'s voxels to a segment the way the Segment Editor's Paint effect does (merge, max)."""
    import slicer

    from MedSIGHTSlicerLib.geometry import labelmap_from_array

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(labelmap_from_array(stroke, volume), node, segment_id, logic.MODE_MERGE_MAX)


def delete_and_undo_in_segment_editor(node, segment_id: str) -> None:
    """Delete a segment and bring it back with the Segment Editor's Undo: its logic saves the segmentation's state
    (vtkSegmentationHistory) before removing the selected segment, and Undo restores that state, which adds a new
    segment object with the deleted one's id, name, colour, tags and voxels (vtkSlicerSegmentEditorLogic)."""
    import slicer

    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(node.GetSegmentation())
    assert history.SaveState()
    before = node.GetSegmentation().GetSegment(segment_id)
    node.GetSegmentation().RemoveSegment(segment_id)
    assert history.RestorePreviousState()
    assert node.GetSegmentation().GetSegment(segment_id) not in (None, before)


def resample_in_place(volume, zoom: float) -> None:
    """What Resample Scalar Volume writing into its input does with ``zoom`` times the spacing and the same voxel
    counts: new voxel n holds the old voxel nearest to where it now lies (``zoom`` n, about voxel 0)."""
    import vtk
    from vtk.util import numpy_support

    from MedSIGHTSlicerLib.geometry import ijk_to_ras, vtk_matrix

    shape = volume_shape(volume)
    old = numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars()).reshape(shape)
    k, j, i = (np.minimum(np.rint(n * zoom).astype(int), size - 1)
               for n, size in zip(np.indices(shape), shape, strict=True))
    image = vtk.vtkImageData()
    image.SetDimensions(*shape[::-1])
    image.AllocateScalars(volume.GetImageData().GetScalarType(), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = old[k, j, i].reshape(-1)
    grid = ijk_to_ras(volume)
    grid[:3, :3] *= zoom
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(vtk_matrix(grid))


def register_segmentation_converters() -> None:
    """Register the four conversion rules Slicer's Segmentations module registers at start-up (slicer-core leaves
    the factory empty). Segmentations copy the rules when they are created, so the Slicer-side conftest calls this
    before any test."""
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())


def slab_answer(node, index: int, rows: slice, cols: slice, label: str = "liver") -> SliceAnswer:
    """An axial (k) slab answer on ``node``'s grid with one rectangular region."""
    import vtk

    from MedSIGHTSlicerLib.protocol import Region, SliceAnswer

    i, j, _ = node.GetImageData().GetDimensions()
    p2i = pixel_to_ijk(2, index, 0, 1)
    mask = np.zeros((j, i), dtype=bool)
    mask[rows, cols] = True
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    bbox = [rows.start, cols.start, rows.stop - 1, cols.stop - 1]
    region = Region("[M0_1]", label, 0, mask, 0.8, bbox)
    return SliceAnswer("axial", index, f"The {label}.", [region], ijk_to_ras @ p2i)
