"""Slices along anatomical planes, as exact array slabs with an exact pixel <-> voxel mapping.

For each plane (axial, coronal, sagittal, in patient space) the array axis most aligned with the
plane's normal is chosen, jointly for the three planes, so any direction matrix works. A slice is then
a slab of the array, transposed and flipped so it displays in radiological convention (axial and
coronal: patient right on the left of the image; axial: anterior up; coronal and sagittal: superior up;
sagittal: anterior on the left). No voxel is interpolated: a truly oblique volume is sliced along its
nearest array axis, and the slice says so (``oblique``, ``obliquity_deg``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import ImagingError
from .volume import Volume

PLANES = ("axial", "coronal", "sagittal")
# RAS normal, direction of increasing column, direction of increasing row (image top to bottom).
_PLANE_FRAMES = {
    "axial": (np.array([0.0, 0.0, 1.0]), np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])),
    "coronal": (np.array([0.0, 1.0, 0.0]), np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "sagittal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
}
#: Slices whose normal is further than this from the anatomical normal are flagged oblique.
OBLIQUE_TOL_DEG = 1e-3


@dataclass(frozen=True)
class SliceLayout:
    """How one plane maps onto array axes (0 = i, 1 = j, 2 = k)."""

    plane: str
    normal_axis: int
    col_axis: int
    row_axis: int
    flip_cols: bool
    flip_rows: bool
    obliquity_deg: float


@dataclass
class Slice:
    """A 2D slice of a volume and the exact map of its pixels to voxels and to patient space.

    ``pixels`` is (rows, cols) or (rows, cols, 3); pixel (col, row) is the voxel
    ``pixel_to_ijk @ (col, row, 0, 1)``; ``slice_to_ras`` maps the same vector to RAS millimetres.
    ``index`` is the array index along ``layout.normal_axis``.
    """

    pixels: np.ndarray
    plane: str
    index: int
    layout: SliceLayout
    pixel_to_ijk: np.ndarray
    slice_to_ras: np.ndarray
    volume_shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]  # (column step, row step) in mm
    thickness: float

    @property
    def oblique(self) -> bool:
        """True when the volume is tilted relative to the anatomical plane (the slab is still exact)."""
        return self.layout.obliquity_deg > OBLIQUE_TOL_DEG

    @property
    def obliquity_deg(self) -> float:
        return self.layout.obliquity_deg

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    def voxel_indices(self) -> np.ndarray:
        """(rows, cols, 3) integer (i, j, k) voxel index of every pixel."""
        rows, cols = self.shape
        y, x = np.mgrid[0:rows, 0:cols]
        pts = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], axis=-1) @ self.pixel_to_ijk.T
        return np.rint(pts[..., :3]).astype(np.int64)

    def paste(self, target: np.ndarray, values: np.ndarray) -> None:
        """Write a (rows, cols) array into a (k, j, i) array at exactly this slice's voxels."""
        if tuple(target.shape[:3]) != self.volume_shape:
            raise ImagingError(f"target shape {target.shape} is not the slice's volume {self.volume_shape}")
        values = np.asarray(values)
        if values.shape[:2] != self.shape:
            raise ImagingError(
                f"mask shape {values.shape} does not match the {self.plane} slice {self.shape}"
            )
        _slab(target, self.layout, self.index)[...] = _orient(values, self.layout)

    def take(self, source: np.ndarray) -> np.ndarray:
        """The values of a (k, j, i) array (e.g. a labelmap) on this slice's pixels."""
        if tuple(source.shape[:3]) != self.volume_shape:
            raise ImagingError(f"array shape {source.shape} is not the slice's volume {self.volume_shape}")
        return np.ascontiguousarray(_orient(_slab(source, self.layout, self.index), self.layout))


def _slab(array_kji: np.ndarray, layout: SliceLayout, index: int) -> np.ndarray:
    """A (rows, cols[, 3]) *view* of the array at ``index`` along the normal, before flips."""
    ijk = np.moveaxis(array_kji, (0, 1, 2), (2, 1, 0))  # view indexed [i, j, k, ...]
    return np.moveaxis(ijk, (layout.row_axis, layout.col_axis, layout.normal_axis), (0, 1, 2))[:, :, index]


def _orient(a: np.ndarray, layout: SliceLayout) -> np.ndarray:
    """Apply the row/column flips (an involution, so it also undoes them)."""
    return a[:: -1 if layout.flip_rows else 1, :: -1 if layout.flip_cols else 1]


def plane_layouts(volume: Volume) -> dict[str, SliceLayout]:
    """For each anatomical plane: the array axes and flips that show it (see module docstring)."""
    d = volume.direction_ras  # columns: RAS directions of i, j, k
    normals = [_PLANE_FRAMES[p][0] for p in PLANES]
    # The three planes get three distinct axes: the permutation with the best total alignment.
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(d[:, perm[n]] @ normals[n]) for n in range(3)),
    )
    out = {}
    for plane, axis in zip(PLANES, best, strict=True):
        normal, u, v = _PLANE_FRAMES[plane]
        a, b = (x for x in range(3) if x != axis)
        # The in-plane axis closer to the image's column direction becomes the columns.
        if abs(d[:, a] @ u) + abs(d[:, b] @ v) >= abs(d[:, b] @ u) + abs(d[:, a] @ v):
            col, row = a, b
        else:
            col, row = b, a
        slab_normal = np.cross(d[:, col], d[:, row])
        cos = abs(slab_normal @ normal) / np.linalg.norm(slab_normal)
        out[plane] = SliceLayout(
            plane,
            axis,
            col,
            row,
            bool(d[:, col] @ u < 0),
            bool(d[:, row] @ v < 0),
            float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))),
        )
    return out


def _check_plane(plane: str) -> str:
    p = plane.lower()
    if p not in _PLANE_FRAMES:
        raise ImagingError(f"unknown plane {plane!r}; use one of {', '.join(PLANES)}")
    return p


def _has_slices(volume: Volume, layout: SliceLayout) -> bool:
    """Whether the plane's slices are more than one voxel wide and high (else they are lines, not images)."""
    size = volume.size_ijk
    return size[layout.col_axis] > 1 and size[layout.row_axis] > 1


def slice_planes(volume: Volume) -> tuple[str, ...]:
    """The planes that can be asked about: those whose slices are at least 2 x 2 voxels.

    A 2D image (one voxel thick) has only the plane it lies in; its other planes would cut it into 1-voxel lines.
    """
    layouts = plane_layouts(volume)
    return tuple(p for p in PLANES if _has_slices(volume, layouts[p]))


def _thin_volume(volume: Volume) -> str:
    """What a volume that is one voxel thick along some axis is, for error messages."""
    k, j, i = volume.shape
    usable = slice_planes(volume)
    if len(usable) == 1:  # one voxel thick along one axis: an image lying in that plane
        kind = f"a single 2D image: only the {usable[0]} plane has slices"
    else:
        kind = "one voxel wide in two or more directions: no plane has slices"
    return f"this volume ({k} x {j} x {i} voxels) is {kind}"


def check_sliceable(volume: Volume) -> None:
    """Raise ImagingError for a volume no plane of which has slices (a line of voxels)."""
    if not slice_planes(volume):
        raise ImagingError(_thin_volume(volume), volume.source)


def _sliceable_layout(volume: Volume, plane: str) -> SliceLayout:
    """The layout of a known plane whose slices are images; ImagingError naming the geometry otherwise."""
    layout = plane_layouts(volume)[_check_plane(plane)]
    if _has_slices(volume, layout):
        return layout
    size = volume.size_ijk
    raise ImagingError(f"{_thin_volume(volume)}; its {layout.plane} slices would be {size[layout.row_axis]} x "
                       f"{size[layout.col_axis]} voxels", volume.source)


def slice_count(volume: Volume, plane: str) -> int:
    """Number of slices of ``volume`` in ``plane``. Raises ImagingError for a plane whose slices would be one voxel
    wide or high (a 2D image's coronal and sagittal planes): see `slice_planes`."""
    return volume.size_ijk[_sliceable_layout(volume, plane).normal_axis]


def extract_slice(volume: Volume, plane: str, index: int) -> Slice:
    """Slice ``index`` (array index along the plane's axis) of ``volume`` in an anatomical plane (one of
    `slice_planes`)."""
    return _slice_at(volume, _sliceable_layout(volume, plane), index)


def iter_slices(volume: Volume, plane: str, indices: Iterable[int] | None = None) -> Iterator[Slice]:
    """Slices ``indices`` (by default all, in array order) of ``volume`` in ``plane``, as `extract_slice` gives
    them. The plane's layout is worked out once: per slice it took 0.3-0.4 ms of CPU, ten times the rest of a
    slice's geometry (1024 slices' geometry for the answers of an ask stopped early: 1.1 s under load)."""
    layout = _sliceable_layout(volume, plane)
    for index in range(volume.size_ijk[layout.normal_axis]) if indices is None else indices:
        yield _slice_at(volume, layout, index)


def _slice_at(volume: Volume, layout: SliceLayout, index: int) -> Slice:
    plane, size = layout.plane, volume.size_ijk
    n = size[layout.normal_axis]
    if not 0 <= index < n:
        raise ImagingError(f"{plane} slice {index} is outside 0..{n - 1}", volume.source)
    p2i = np.zeros((4, 4))
    p2i[layout.col_axis, 0] = -1.0 if layout.flip_cols else 1.0
    p2i[layout.row_axis, 1] = -1.0 if layout.flip_rows else 1.0
    p2i[layout.normal_axis, 2] = 1.0
    p2i[layout.col_axis, 3] = size[layout.col_axis] - 1 if layout.flip_cols else 0
    p2i[layout.row_axis, 3] = size[layout.row_axis] - 1 if layout.flip_rows else 0
    p2i[layout.normal_axis, 3] = index
    p2i[3, 3] = 1.0
    pixels = np.ascontiguousarray(_orient(_slab(volume.array, layout, index), layout))
    sp = volume.spacing
    return Slice(
        pixels=pixels,
        plane=plane,
        index=int(index),
        layout=layout,
        pixel_to_ijk=p2i,
        slice_to_ras=volume.ijk_to_ras @ p2i,
        volume_shape=volume.shape,
        pixel_spacing=(sp[layout.col_axis], sp[layout.row_axis]),
        thickness=sp[layout.normal_axis],
    )


def slice_at_ras(volume: Volume, plane: str, ras: tuple[float, float, float]) -> Slice:
    """The slice in ``plane`` containing the voxel nearest to a RAS point (e.g. Slicer's crosshair)."""
    plane = _check_plane(plane)
    ijk = np.linalg.solve(volume.ijk_to_ras, np.append(np.asarray(ras, dtype=float), 1.0))[:3]
    return extract_slice(volume, plane, int(np.rint(ijk[plane_layouts(volume)[plane].normal_axis])))


def slice_for_view(volume: Volume, view_to_ras: np.ndarray) -> Slice:
    """The slice a viewer shows: plane and index from a view's slice-to-RAS matrix (e.g. Slicer's SliceToRAS).

    ``view_to_ras`` is 4x4; its third column is the view's normal and its fourth a point on the view's plane,
    both in the volume's RAS frame. The plane is the one whose array axis is closest to the view's normal (so a
    sagittally acquired volume shown in an axial view answers about its axial slab); the index is the voxel layer
    nearest to the view's point. Raises ImagingError for a malformed matrix or a view outside the volume.
    """
    matrix = np.asarray(view_to_ras, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ImagingError("the view's slice-to-RAS must be a finite 4x4 matrix")
    if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)):
        # Not an affine transform (a client's row/column mix-up, say): reading its point would answer another slice.
        raise ImagingError(f"the view's slice-to-RAS must be affine: its last row is {matrix[3].tolist()}, "
                           "not [0, 0, 0, 1]")
    normal = matrix[:3, 2]
    length = float(np.linalg.norm(normal))
    if length < 1e-9:
        raise ImagingError("the view's slice-to-RAS has no normal (third column is zero)")
    normal = normal / length
    layouts = plane_layouts(volume)
    axes = volume.direction_ras
    plane = max(PLANES, key=lambda p: abs(float(axes[:, layouts[p].normal_axis] @ normal)))
    axis = layouts[plane].normal_axis
    ijk = np.linalg.solve(volume.ijk_to_ras, np.append(matrix[:3, 3], 1.0))[:3]
    count = volume.size_ijk[axis]
    # A finite point can still be infinitely many voxels away (1e300 mm at a spacing of 1e-10 mm): outside too.
    index = int(np.rint(ijk[axis])) if np.isfinite(ijk[axis]) else -1
    if not 0 <= index < count:
        raise ImagingError(f"the view shows no slice of the volume ({plane} position {ijk[axis]:.1f} is outside "
                           f"0..{count - 1})", volume.source)
    return extract_slice(volume, plane, index)
