"""Slice views and the volume's frame: which plane the user looks at, and where "Centre on region" goes.

Slicer shows slices in *world* coordinates; the module uploads a volume in its own (local) frame, the one its
IJKToRAS describes, so that a volume under a parent transform uploads the same voxels and geometry whatever the
transform does. The view's SliceToRAS is therefore brought into the volume's frame before it goes to the engine, and
answers come back in that frame (the suggested segments sit under the same parent transform, see ``suggestions``).

MRML only (no Qt, no layout manager): slice nodes are found in the scene by their layout name, which works in
every layout, also those that show no Red view.
"""

from __future__ import annotations

import itertools

import numpy as np
import vtk

from .geometry import GeometryError, _matrix_to_numpy, nodes_by_class
from .protocol import PLANES

__all__ = ["PLANE_NORMALS", "VIEW_NAMES", "centre_views_on", "parent_to_world", "plane_slice_counts",
           "region_centre_ras", "slice_node", "view_in_volume_frame", "view_plane"]

#: The slice views a question can be about (their layout names).
VIEW_NAMES = ("Red", "Yellow", "Green")


#: The anatomical planes and their RAS normals, in the engine's order (``medsight.imaging.slicing``: ``PLANES`` and
#: the normals of its plane frames; Testing/test_contracts.py checks that both sides name a view's plane alike).
PLANE_NORMALS = dict(zip(PLANES, ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))))


def view_plane(view_to_ras, ijk_to_ras_matrix) -> str:
    """The plane ("axial", "coronal", "sagittal") the engine answers a view with, for a volume with this IJKToRAS:
    the plane a slice range or the whole volume is asked along when that view is the chosen one, so a range scrolls
    the way the view does.

    As the engine does: the volume's three array axes are named by the assignment to the three planes with the best
    total alignment, and the view gets the axis nearest to its normal. On a double-oblique acquisition (a cardiac
    short axis) that is not always the anatomical plane nearest to the view's normal.
    """
    axes = _unit_axes(ijk_to_ras_matrix)
    plane_axes = _plane_axes(axes)
    normal = np.asarray(view_to_ras, dtype=float)[:3, 2]
    return max(PLANE_NORMALS, key=lambda plane: abs(axes[:, plane_axes[plane]] @ normal))


def plane_slice_counts(ijk_to_ras_matrix, dimensions_ijk) -> dict[str, int]:
    """Slices per plane of a volume with this IJKToRAS and (i, j, k) voxel counts, as the engine counts them (its
    ``VolumeInfo.slices``): only the planes whose slices are at least 2 x 2 voxels (a 2D image has one)."""
    dimensions = [int(n) for n in dimensions_ijk]
    return {plane: dimensions[axis] for plane, axis in _plane_axes(_unit_axes(ijk_to_ras_matrix)).items()
            if all(dimensions[other] > 1 for other in range(3) if other != axis)}


def _unit_axes(ijk_to_ras_matrix) -> np.ndarray:
    axes = np.asarray(ijk_to_ras_matrix, dtype=float)[:3, :3]
    return axes / np.linalg.norm(axes, axis=0)


def _plane_axes(unit_axes: np.ndarray) -> dict[str, int]:
    """The array axis (0: i, 1: j, 2: k) each plane's slices are taken across: the assignment of the three axes to
    the three planes with the best total alignment (the engine's ``plane_layouts``)."""
    normals = np.array(list(PLANE_NORMALS.values()))
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(unit_axes[:, perm[n]] @ normals[n]) for n in range(3)))
    return dict(zip(PLANE_NORMALS, best))


def slice_node(scene, view_name: str):
    """The slice node shown in the view ``view_name`` ("Red", "Yellow", "Green"), or None."""
    return next((node for node in nodes_by_class(scene, "vtkMRMLSliceNode") if node.GetLayoutName() == view_name),
                None)


def parent_to_world(node) -> np.ndarray:
    """The 4x4 map from ``node``'s own frame to world coordinates (identity without a parent transform).

    Raises GeometryError for a non-linear (warping) transform: no single plane then matches the view.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not transform.GetMatrixTransformToWorld(matrix):
        raise GeometryError(f"{node.GetName()!r} is under a non-linear transform: harden it first "
                            "(Data module: right-click the transform > Harden transform)")
    return _matrix_to_numpy(matrix)


def view_in_volume_frame(slice_node_, volume_node) -> np.ndarray:
    """The view's SliceToRAS expressed in the volume's own frame (what the engine's ``view`` takes)."""
    slice_to_world = _matrix_to_numpy(slice_node_.GetSliceToRAS())
    return np.linalg.inv(parent_to_world(volume_node)) @ slice_to_world


def region_centre_ras(slice_to_ras, bbox) -> np.ndarray:
    """RAS (in the volume's frame) of the centre of a region's bounding box (row0, col0, row1, col1)."""
    row0, col0, row1, col1 = bbox
    pixel = np.array([(col0 + col1) / 2.0, (row0 + row1) / 2.0, 0.0, 1.0])
    return (np.asarray(slice_to_ras, dtype=float) @ pixel)[:3]


def centre_views_on(scene, point_ras_local, volume_node) -> np.ndarray:
    """Centre every slice view on a point of the volume's frame (not just move each view's plane through it, which
    is what the default jump mode does). Returns the world point."""
    import slicer

    world = (parent_to_world(volume_node) @ np.append(np.asarray(point_ras_local, dtype=float), 1.0))[:3]
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(world[0]), float(world[1]), float(world[2]),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return world
