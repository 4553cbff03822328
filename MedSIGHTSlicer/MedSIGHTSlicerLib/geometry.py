"""Voxel geometry between Slicer nodes, the engine's upload format and the engine's slice answers.

Slicer nodes describe voxels in RAS (``IJKToRAS``); the engine takes LPS geometry (as DICOM and ITK do) and
answers with ``slice_to_ras`` matrices mapping a slice pixel (col, row, 0, 1) to RAS millimetres. Everything here
uses the volume's *local* IJKToRAS (its parent transform is ignored on both the way out and the way back, so the
round trip is exact whatever transform the volume sits under); only a segmentation under another transform than
its volume's gets its voxels mapped between the two frames.

Only numpy, vtk and Slicer's MRML classes: no Qt, no ``slicer.util`` application helpers.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

__all__ = [
    "DIRECTION_TOLERANCE",
    "GRID_TOLERANCE",
    "GeometryError",
    "array_from_image",
    "grid_holding",
    "grid_within",
    "ijk_to_ras",
    "labelmap_from_array",
    "lattice_box",
    "lattice_grid",
    "mask_on_grid",
    "mask_to_ijk",
    "nodes_by_class",
    "reference_lattice",
    "same_lattice",
    "segment_array",
    "shape_text",
    "volume_shape",
    "volume_upload_arrays",
    "voxel_grid",
    "voxels_replaced",
    "vtk_matrix",
]

# A mapped pixel must land this close (in voxels) to an integer voxel index, else the slice is not on the grid.
GRID_TOLERANCE = 1e-3
#: How far the voxel axes' unit directions may be from orthonormal (D^T D vs I): the engine's ``check_geometry``
#: tolerance (Testing/test_contracts.py checks they agree), so what is refused here is what the engine would refuse.
DIRECTION_TOLERANCE = 1e-3
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class GeometryError(ValueError):
    """A mask or array does not fit the volume's voxel grid."""


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4x4 numpy array as a vtkMatrix4x4 (what MRML nodes take)."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def nodes_by_class(scene, class_name: str) -> list:
    """The nodes of ``scene`` of class ``class_name``, in scene order.

    ``vtkMRMLScene.GetNodesByClass`` returns a new collection the caller must delete (vtkMRMLScene.h); from Python it
    is never deleted, so it, and a reference to every node in it, would outlive the call: a segmentation removed from
    the scene later would keep its voxels in memory. Released here as ``slicer.util.getNodesByClass`` does.
    """
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]


def ijk_to_ras(volume_node) -> np.ndarray:
    """The 4x4 map from an (i, j, k) index of the node's voxel array (``array_from_image``: first voxel 0) to RAS.

    That is the node's IJKToRAS, shifted to where its image's extent starts: Slicer places the voxel at extent index
    e at IJKToRAS @ e (``vtkMRMLVolumeNode::ShiftImageDataExtentToZeroStart`` keeps it there), and an image from a
    script or a filter may start elsewhere than 0.
    """
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    array_to_ras = _matrix_to_numpy(matrix)
    image = volume_node.GetImageData()
    if image is not None:
        array_to_ras[:3, 3] += array_to_ras[:3, :3] @ np.array(image.GetExtent()[::2], dtype=np.float64)
    return array_to_ras


def volume_shape(volume_node) -> tuple[int, int, int]:
    """(k, j, i) voxel counts of the node's image; a GeometryError naming the volume when it has none."""
    image = volume_node.GetImageData()
    if image is None:
        raise GeometryError(f"volume {volume_node.GetName()!r} has no image data")
    i, j, k = image.GetDimensions()
    return int(k), int(j), int(i)


def array_from_image(image) -> np.ndarray:
    """A (k, j, i[, c]) numpy *copy* of a vtkImageData's scalars (copy: VTK may free or reuse its buffer)."""
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise GeometryError("image has no scalars")
    i, j, k = image.GetDimensions()
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).copy()
    shape = (k, j, i) if components == 1 else (k, j, i, components)
    return array.reshape(shape)


def volume_upload_arrays(volume_node) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """What ``MedSIGHTClient.upload_volume`` needs from a scalar volume node.

    Returns:
        (array_kji, spacing, origin_lps, direction_lps): the voxels as a (k, j, i) array; spacing (i, j, k) mm;
        origin in LPS mm; the 3x3 LPS direction matrix (columns: i, j, k axes) as 9 row-major numbers.
    """
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None or 0 in image.GetDimensions():
        # Listed by the volume selector all the same: e.g. Crop Volume's new output before Apply, a failed load.
        raise GeometryError(f"The volume {volume_node.GetName()!r} has no image data: choose a volume that holds an "
                            "image.")
    array = array_from_image(image)
    if array.ndim != 3:
        raise GeometryError(f"volume {volume_node.GetName()!r} has {array.shape[-1]} components; expected a scalar")
    if array.dtype == np.uint8 and array.shape[-1] == 3:
        # The engine reads a uint8 upload whose last axis is 3 as one (H, W, 3) colour photo: a grey volume three
        # voxels wide would become a 2D image. uint16 holds the same values and is always read as a volume.
        array = array.astype(np.uint16)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # NaN voxels are sent as they are: the engine reads them as the volume's smallest value and says how many
        # (VolumeInfo.nan_filled). What it refuses, infinite voxels or no number at all, is refused here, before the
        # whole volume is sent, naming the volume.
        infinite = int(np.isinf(array).sum())
        if infinite:
            raise GeometryError(f"volume {volume_node.GetName()!r} has {infinite} infinite voxels, which no window "
                                "can show: replace them with finite values first")
        if np.isnan(array).all():
            raise GeometryError(f"volume {volume_node.GetName()!r} holds no number: all {array.size} voxels are NaN")
    matrix = ijk_to_ras(volume_node)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(spacing <= 0):
        raise GeometryError(f"volume {volume_node.GetName()!r} has a degenerate IJKToRAS matrix")
    directions = axes / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=DIRECTION_TOLERANCE):
        raise GeometryError(f"volume {volume_node.GetName()!r} has sheared voxel axes (not at right angles, e.g. after "
                            "hardening a transform with shear, or a gantry tilt): resample it onto a regular grid "
                            "first (e.g. Crop Volume with interpolated cropping)")
    direction_lps = _RAS_TO_LPS @ directions
    origin_lps = _RAS_TO_LPS @ matrix[:3, 3]
    return (
        array,
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin_lps),
        tuple(float(d) for d in direction_lps.reshape(-1)),
    )


def mask_to_ijk(slice_to_ras: np.ndarray, mask: np.ndarray, volume_node) -> np.ndarray:
    """The (k, j, i) voxel indices of a slice mask's pixels, as an (N, 3) int64 array.

    Each set pixel (col, row) goes through ``slice_to_ras`` then the volume's RASToIJK. The result must be an
    integer voxel (within ``GRID_TOLERANCE``) inside the volume: the engine slices along array axes, so anything
    else means the answer was computed on another volume or another geometry.
    """
    matrix = np.asarray(slice_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise GeometryError(f"slice_to_ras must be 4x4, got {matrix.shape}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise GeometryError(f"mask must be (rows, cols), got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    pixels = np.stack([cols, rows, np.zeros_like(cols), np.ones_like(cols)]).astype(np.float64)
    ijk = (np.linalg.inv(ijk_to_ras(volume_node)) @ matrix @ pixels)[:3]
    nearest = np.rint(ijk)
    error = float(np.max(np.abs(ijk - nearest)))
    if error > GRID_TOLERANCE:
        raise GeometryError(
            f"the answer's slice is not on the grid of volume {volume_node.GetName()!r} "
            f"(pixels land {error:.3g} voxels off); was it asked about another volume?"
        )
    ijk_int = nearest.astype(np.int64)
    k, j, i = volume_shape(volume_node)
    inside = np.all((ijk_int >= 0) & (ijk_int < np.array([[i], [j], [k]])), axis=0)
    if not np.all(inside):
        raise GeometryError(
            f"{int((~inside).sum())} mask pixels fall outside volume {volume_node.GetName()!r} ({i}x{j}x{k} voxels)"
        )
    return np.ascontiguousarray(ijk_int[::-1].T)


def _volume_to_node(volume_node, node) -> np.ndarray:
    """The 4x4 map from the volume's own frame into ``node``'s own frame (identity under the same transform).

    A segmentation need not sit under its volume's transform (the Segment Editor allows it), so voxels written for
    or read from it must cross between the two frames. Raises GeometryError when that map warps.
    """
    if node is None or node.GetTransformNodeID() == volume_node.GetTransformNodeID():
        return np.eye(4)
    import slicer

    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volume_node.GetParentTransformNode(), node.GetParentTransformNode(), matrix):
        raise GeometryError(f"{node.GetName()!r} and {volume_node.GetName()!r} sit under different transforms and "
                            "one of them warps: harden it first (Data module: right-click the transform > Harden "
                            "transform)")
    return _matrix_to_numpy(matrix)


#: Where voxels written into a segmentation node go: (the 4x4 map from a (i, j, k) index of the volume's voxel array
#: to the node's own frame, the volume's (k, j, i) voxel counts).
Grid = tuple[np.ndarray, tuple[int, int, int]]


def _grid_name(grid: Grid | None) -> str:
    """How an error names where voxels were to go: a ``grid`` argument, or by default the volume's grid."""
    return "the grid" if grid is not None else "the volume's grid"


def shape_text(shape: tuple[int, ...]) -> str:
    """A (k, j, i) voxel count as users read it, i x j x k ("512x512x300"); "no" for () (no image data)."""
    return "x".join(str(n) for n in shape[::-1]) or "no"


def voxels_replaced(name: str, then: tuple[int, ...], now: tuple[int, ...], since: str = "since",
                    when: str = "then") -> str:
    """How a refusal says that the voxels of the volume ``name`` were replaced (``then`` and ``now``: its (k, j, i)
    voxel counts; ``since`` and ``when`` say since when, e.g. "while the question ran" and "when asked")."""
    if tuple(then) == tuple(now):
        return (f"the voxels of {name!r} were replaced {since} (resampled or changed in place: {shape_text(now)} "
                f"voxels as {when}, other values)")
    return (f"the voxels of {name!r} were replaced by another grid size {since} ({shape_text(then)} voxels {when}, "
            f"{shape_text(now)} now)")


def voxel_grid(volume_node, node=None) -> Grid:
    """The volume's voxel grid as it lies in ``node``'s own frame now (default: a node under the volume's transform).

    Kept with what was written into a segmentation, it reads those voxels back exactly where they were written,
    whatever is done later to the volume's grid or transform or to the node's transform (none of them moves a
    segment's own voxels).
    """
    return _volume_to_node(volume_node, node) @ ijk_to_ras(volume_node), volume_shape(volume_node)


def _reference_labelmap(volume_node, node=None, grid: Grid | None = None, box=None):
    """An empty uint8 vtkOrientedImageData on ``grid`` (default: the volume's grid in ``node``'s frame), all of it or
    only the voxels of ``box`` ((k, j, i) start and stop indices)."""
    import slicer  # deferred: importing MRML is slow and this module's pure-numpy parts don't need it

    matrix, shape = grid if grid is not None else voxel_grid(volume_node, node)
    (k0, j0, i0), (k1, j1, i1) = box if box is not None else ((0, 0, 0), shape)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(vtk_matrix(matrix))
    return image


def mask_box(mask_kji: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box around a mask's set (non-zero) voxels as (first, end) index tuples, end excluded, or None when none
    is set. Each axis is found on the slab the axes before it left, not with ``np.nonzero`` over the whole volume:
    for one streamed slice's voxels in a 120 x 256 x 256 CT that took 70 ms, 4 times this, and 0.57 s for a large
    segment, 50 times this (benchmarks/slicer_answer_placement.py)."""
    slab = np.asarray(mask_kji)
    first: list[int] = []
    end: list[int] = []
    for axis in range(slab.ndim):
        hits = np.flatnonzero(np.any(slab, axis=tuple(a for a in range(slab.ndim) if a != axis)))
        if not hits.size:
            return None
        first.append(int(hits[0]))
        end.append(int(hits[-1]) + 1)
        slab = slab[(slice(None),) * axis + (slice(first[-1], end[-1]),)]
    return tuple(first), tuple(end)


def labelmap_from_array(array_kji: np.ndarray, volume_node, node=None, grid: Grid | None = None,
                        crop: bool = False, box=None):
    """A binary (0/1 uint8) vtkOrientedImageData on the volume's grid from a (k, j, i) array, placed for the
    segmentation ``node`` it goes into (default: a node under the volume's own transform), or on ``grid``.

    ``crop``: only the box around the set voxels (an empty array: the whole grid), as Slicer's own labelmap import
    keeps a segment (``ImportLabelmapToSegmentationNode`` clips to the effective extent): a segment added with the
    whole grid holds a byte per voxel of the volume, 78 MB for a 512 x 512 x 300 CT, however small it is.

    ``box``: ``array_kji`` holds only the voxels of that box of the grid ((k, j, i) start and stop indices).
    """
    array = np.asarray(array_kji)
    shape = grid[1] if grid is not None else volume_shape(volume_node)
    if box is not None:
        shape = tuple(int(stop - start) for start, stop in zip(*box))
    if array.shape != shape:
        raise GeometryError(f"array shape {array.shape} is not the (k, j, i) shape {shape} of {_grid_name(grid)}")
    if box is None and crop:
        box = mask_box(array)
        if box is not None:
            array = array[tuple(slice(lo, hi) for lo, hi in zip(*box))]
    image = _reference_labelmap(volume_node, node, grid, box)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = (array.reshape(-1) != 0).astype(np.uint8)
    image.Modified()
    return image


def lattice_grid(node, segment_id: str, mask_kji: np.ndarray, mask_grid: Grid) -> Grid:
    """The lattice of a segment's own labelmap over a box holding the segment and ``mask_kji`` (a mask on
    ``mask_grid``, in ``node``'s frame); ``mask_grid`` while the segment has no voxels.

    A segment need not lie on its volume's voxels: a segmentation may be finer (oversampled in the Segment Editor) or
    made on another image, and saving one moves its segments onto a shared layer's lattice. Reading and writing it
    on its own lattice keeps every voxel of it; on the volume's grid a finer segment would be rewritten coarser.
    """
    import slicer

    segment = node.GetSegmentation().GetSegment(segment_id)
    layer = None if segment is None else segment.GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    extent = layer.GetExtent() if layer is not None else (0, -1, 0, -1, 0, -1)
    if any(extent[2 * n] > extent[2 * n + 1] for n in range(3)):
        return mask_grid
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    lattice = _matrix_to_numpy(matrix)
    lo, hi = np.array(extent[::2]), np.array(extent[1::2])
    lattice[:3, 3] += lattice[:3, :3] @ lo
    i, j, k = (hi - lo + 1).astype(int)
    return grid_holding((lattice, (int(k), int(j), int(i))), mask_kji, mask_grid)


def reference_lattice(node) -> np.ndarray | None:
    """The lattice a segmentation node's segments are saved on, in its own frame (the 4x4 map from an (i, j, k) index
    to it), or None when it has none: its "ReferenceImageGeometry" conversion parameter, set from its volume when it
    was made. Slicer's save resamples every segment onto it (``vtkSegmentation::DetermineCommonLabelmapGeometry``),
    and it does not follow the volume: a volume whose spacing or directions are edited later, or a segmentation put
    under another transform, leaves it where it was."""
    import slicer

    converter = slicer.vtkSegmentationConverter
    geometry = node.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    matrix = vtk.vtkMatrix4x4()
    extent = [0, -1, 0, -1, 0, -1]
    if not geometry or not converter.DeserializeImageGeometry(geometry, matrix, extent):
        return None
    return _matrix_to_numpy(matrix)


def lattice_box(lattice: np.ndarray, mask_kji: np.ndarray, mask_grid: Grid) -> Grid:
    """The lattice ``lattice`` (a 4x4 index-to-frame map) over a box holding only ``mask_kji``'s voxels (a non-empty
    mask on ``mask_grid``, in the same frame), not the whole volume that lattice was set from."""
    first = np.argwhere(mask_kji)[0][::-1]
    start = np.rint((np.linalg.inv(lattice) @ mask_grid[0] @ np.append(first, 1.0))[:3])
    near = lattice.copy()
    near[:3, 3] += lattice[:3, :3] @ start
    return grid_holding((near, (1, 1, 1)), mask_kji, mask_grid)


def grid_holding(grid: Grid, mask_kji: np.ndarray | None, mask_grid: Grid) -> Grid:
    """``grid``'s lattice over a box holding its own voxels and the box around ``mask_kji``'s voxels (a mask on
    ``mask_grid``; None: all of ``mask_grid``), both grids in one node's frame: e.g. the volume's voxels grown to
    reach a segment that sticks out of the volume's box."""
    matrix, shape = grid
    if mask_kji is None:
        first, last = np.full(3, -0.5), np.array(mask_grid[1][::-1], dtype=float) - 0.5
    else:
        box = mask_box(mask_kji)
        if box is None:
            return grid
        # The corners of the mask's box (voxel edges, half a voxel out from the centres).
        first = np.array(box[0][::-1], dtype=float) - 0.5
        last = np.array(box[1][::-1], dtype=float) - 0.5
    corners = np.array([[(first, last)[c >> n & 1][n] for n in range(3)] + [1.0] for c in range(8)]).T
    indices = (np.linalg.inv(matrix) @ mask_grid[0] @ corners)[:3]
    lo = np.minimum(0.0, np.floor(indices.min(axis=1)))
    hi = np.maximum(np.array(shape[::-1], dtype=float) - 1, np.ceil(indices.max(axis=1)))
    grown = matrix.copy()
    grown[:3, 3] += matrix[:3, :3] @ lo
    i, j, k = (hi - lo + 1).astype(int)
    return grown, (int(k), int(j), int(i))


def _whole_voxel_shift(matrix: np.ndarray, other: np.ndarray) -> np.ndarray | None:
    """The (i, j, k) whole-voxel shift from ``matrix``'s lattice to ``other``'s, or None when they are not one lattice
    (other axes, or shifted by part of a voxel)."""
    between = np.linalg.inv(matrix) @ other
    shift = between[:3, 3]
    if np.allclose(between[:3, :3], np.eye(3), atol=1e-6) and np.allclose(shift, np.rint(shift), atol=1e-6):
        return np.rint(shift)
    return None


def same_lattice(image, other) -> bool:
    """Whether two vtkOrientedImageData's voxels lie on one lattice (same axes, shifted by whole voxels)."""
    matrices = []
    for each in (image, other):
        matrix = vtk.vtkMatrix4x4()
        each.GetImageToWorldMatrix(matrix)
        matrices.append(_matrix_to_numpy(matrix))
    return _whole_voxel_shift(*matrices) is not None


def grids_share_lattice(grid: Grid, other: Grid) -> bool:
    """Whether two grids' voxels lie on one lattice (same axes, shifted by whole voxels): a mask goes from one to the
    other and back exactly wherever both boxes hold it."""
    return _whole_voxel_shift(grid[0], other[0]) is not None


def grid_within(grid: Grid, outer: Grid) -> bool:
    """Whether every voxel of ``grid`` is a voxel of ``outer`` (one lattice, ``grid``'s box inside ``outer``'s)."""
    shift = _whole_voxel_shift(outer[0], grid[0])
    return shift is not None and bool(np.all(shift >= 0) and np.all(shift + grid[1][::-1] <= outer[1][::-1]))


def mask_on_grid(mask_kji: np.ndarray, mask_grid: Grid, grid: Grid) -> np.ndarray:
    """A mask on ``mask_grid`` as a mask on ``grid`` (both in one node's frame; nearest neighbour)."""
    import slicer

    if not np.any(mask_kji):
        return np.zeros(grid[1], dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap_from_array(mask_kji, None, grid=mask_grid, crop=True), _reference_labelmap(None, grid=grid),
        resampled, False, False,
    ):
        raise GeometryError("could not resample the voxels onto the segment's grid")
    return array_from_image(resampled) != 0


def segment_array(segmentation_node, segment_id: str, volume_node, grid: Grid | None = None) -> np.ndarray:
    """A segment's voxels as a boolean (k, j, i) array on the volume's grid (a copy), or on ``grid``.

    Segments may share one labelmap layer (told apart by label value) and may have a cropped extent, so the layer
    is resampled (nearest neighbour) onto the volume's grid and compared with the segment's label value. The grid is
    taken where the volume is shown, also when the segmentation sits under another transform.
    """
    import slicer

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"no segment {segment_id!r} in {segmentation_node.GetName()!r}")
    layer = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    shape = grid[1] if grid is not None else volume_shape(volume_node)
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, layer, False):
        return np.zeros(shape, dtype=bool)
    reference = _reference_labelmap(volume_node, segmentation_node, grid)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        layer, reference, resampled, False, False
    ):
        raise GeometryError(f"could not resample segment {segment_id!r} onto {_grid_name(grid)}")
    values = array_from_image(resampled)
    if values.shape != shape:
        # Resampling pads to the reference extent; a mismatch means the reference geometry itself differs.
        raise GeometryError(f"segment {segment_id!r} resampled to {values.shape}, not the shape {shape} of "
                            f"{_grid_name(grid)}")
    return values == segment.GetLabelValue()

