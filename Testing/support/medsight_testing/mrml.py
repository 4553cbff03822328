"""Real MRML volume nodes for Slicer-side tests (slicer-core)."""

from __future__ import annotations

import numpy as np

SHAPE_KJI = (9, 11, 13)


def oblique_matrix() -> np.ndarray:
    """IJKToRAS with anisotropic spacing, a rotation about a tilted axis and an off-origin offset."""
    axis = np.array([0.3, -0.5, 0.8])
    axis /= np.linalg.norm(axis)
    angle = np.radians(23.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.8, 1.1, 2.5])
    matrix[:3, 3] = [-12.5, 40.25, 7.0]
    return matrix


def make_volume(scene, array_kji: np.ndarray, matrix: np.ndarray, name: str = "CT", dtype=np.int16):
    """A vtkMRMLScalarVolumeNode holding ``array_kji`` as ``dtype`` voxels with IJKToRAS ``matrix``, added to
    ``scene``."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    k, j, i = array_kji.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array_kji.reshape(-1)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetAndObserveImageData(image)
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, matrix[r, c])
    node.SetIJKToRASMatrix(vtk_matrix)
    return node


def sphere(shape=SHAPE_KJI, centre=(4, 5, 6), radius=3.2) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def pixel_to_ijk(
    plane_axis: int, index: int, col_axis: int, row_axis: int, shape_ijk=None, flip_cols=False, flip_rows=False
) -> np.ndarray:
    """A 4x4 map (col, row, 0, 1) -> (i, j, k, 1) for a slice that is an array slab (axes: 0=i, 1=j, 2=k).

    With a flip, pixel 0 is the last voxel along that axis (``shape_ijk`` is then needed).
    """
    if sorted((plane_axis, col_axis, row_axis)) != [0, 1, 2]:
        raise ValueError("plane, column and row axes must be a permutation of 0, 1, 2")
    matrix = np.zeros((4, 4))
    matrix[col_axis, 0] = -1.0 if flip_cols else 1.0
    matrix[row_axis, 1] = -1.0 if flip_rows else 1.0
    matrix[plane_axis, 3] = float(index)
    if flip_cols:
        matrix[col_axis, 3] = shape_ijk[col_axis] - 1
    if flip_rows:
        matrix[row_axis, 3] = shape_ijk[row_axis] - 1
    matrix[3, 3] = 1.0
    return matrix


def add_slice_views(scene) -> dict:
    """Red, Yellow and Green slice nodes (axial, sagittal, coronal) as the application makes them, by name."""
    import slicer

    from MedSIGHTSlicerLib.views import VIEW_NAMES

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # what the application does at start-up
    views = {}
    for name, orient in zip(VIEW_NAMES, ("Axial", "Sagittal", "Coronal"), strict=True):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # gets the scene's default orientation presets
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetDefaultOrientation(orient)
        node.SetOrientation(orient)
        node.SetDimensions(256, 256, 1)
        node.SetFieldOfView(250.0, 250.0, 1.0)
        views[name] = node
    return views


def view_origin(view) -> np.ndarray:
    """Where a slice view is centred, in world RAS."""
    return np.array([view.GetSliceToRAS().GetElement(r, 3) for r in range(3)])


def put_under_transform(scene, node, translate=(30.0, -12.0, 8.0), rotate_z: float = 35.0):
    """Put ``node`` under a new linear transform (a shift, then a turn about S). Returns the transform node."""
    import slicer
    import vtk

    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    motion = vtk.vtkTransform()
    motion.Translate(*translate)
    motion.RotateZ(rotate_z)
    transform.SetMatrixTransformToParent(motion.GetMatrix())
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def world_points(node, segment_id: str) -> np.ndarray:
    """The world RAS of every voxel of a segment, from its own labelmap and its node's transform (sorted rows)."""
    import slicer
    import vtk

    from MedSIGHTSlicerLib.geometry import array_from_image
    from MedSIGHTSlicerLib.views import parent_to_world

    segment = node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    image_to_node = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = image.GetExtent()
    k, j, i = np.nonzero(array_from_image(image) == segment.GetLabelValue())
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    points = (parent_to_world(node) @ image_to_node @ ijk)[:3].T
    return points[np.lexsort(points.T[::-1])]



def mask_world_points(volume_node, mask: np.ndarray) -> np.ndarray:
    """The world RAS of every voxel of a (k, j, i) mask on a volume's grid, through the volume's transforms: where
    ``world_points`` must find a segment shown on those voxels (sorted rows, as it gives them)."""
    from MedSIGHTSlicerLib.geometry import ijk_to_ras
    from MedSIGHTSlicerLib.views import parent_to_world

    k, j, i = np.nonzero(mask)
    points = (parent_to_world(volume_node) @ ijk_to_ras(volume_node) @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    return points[np.lexsort(points.T[::-1])]

def oversampled(volume_node) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The lattice of the Segment Editor's geometry with oversampling 2 over ``volume_node`` and its (k, j, i) voxel
    counts (a ``geometry.Grid``): fine voxels 2n and 2n + 1 halve its voxel n, whose centre is their shared corner
    (nearest-neighbour resampling onto the volume's voxels reads fine voxel 2n + 1 there, never 2n)."""
    from MedSIGHTSlicerLib.geometry import ijk_to_ras, volume_shape

    fine = ijk_to_ras(volume_node)
    fine[:3, 3] -= fine[:3, :3] @ np.full(3, 0.25)  # fine voxel 0 is the first quarter of voxel 0
    fine[:3, :3] /= 2
    return fine, tuple(2 * n for n in volume_shape(volume_node))
