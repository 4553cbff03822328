"""Acquisition geometry regularization: a DICOM series whose slices do not lie on a regular grid resampled onto
one, as 3D Slicer's "acquisition geometry regularization" places it. Two cases, each its own option:

Gantry tilt (`resample_tilted`): a stack of parallel, evenly spaced slices whose positions drift within their plane
(a CT acquired with a tilted gantry: the table moves along the body axis, the slices are tilted from it). The grid
keeps the slices' own planes, axes and pixel spacing, with the slice axis along their normal: each output slice is its
acquired slice shifted within its plane by a fraction of a pixel, so nothing is interpolated between slices. The grid
is widened to hold every shifted slice whole; voxels no slice covers get the volume's minimum.

Uneven spacing (`resample_spacing`): parallel slices unevenly spaced along their normal (a missing slice, a drifting
table step). The grid is ITK's, the one 3D Slicer's volume has under its regularization transform and keeps when it is
hardened: as many slices as were acquired, evenly from the first to the last. Each output slice is interpolated
linearly between the two acquired slices around its position.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk  # noqa: N813

from .errors import ImagingError
from .volume import check_size

#: In-plane grid steps are rounded up past this fraction of a pixel only: positions written to a few decimals make a
#: whole-pixel span a hair longer, which must not add a column of fill.
_SPAN_ROUNDING = 1e-3


def tilt_degrees(positions: np.ndarray, normal: np.ndarray) -> float:
    """The angle between the slices' normal and the line through the first and last slice positions."""
    stack = positions[-1] - positions[0]
    length = float(np.linalg.norm(stack))
    return math.degrees(math.acos(min(1.0, abs(float(stack @ normal)) / length))) if length else 0.0


def resample_tilted(
    array: np.ndarray,
    positions: np.ndarray,
    direction: np.ndarray,
    spacing: tuple[float, float, float],
    path: str,
    max_voxels: int,
) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """(array, origin, what was done in words) of the (k, j, i) ``array`` whose slice k lies at ``positions[k]``
    (LPS, sorted along the normal, the third column of ``direction``), resampled onto the grid described above."""
    if array.ndim != 3:
        raise ImagingError("a tilted colour series cannot be regularized: only grey images are resampled", path)
    row_dir, col_dir = direction[:, 0], direction[:, 1]
    relative = positions - positions[0]
    u, v = relative @ row_dir, relative @ col_dir  # each slice's in-plane offset from the first, mm
    n_slices, rows, columns = array.shape
    extra = [max(0, math.ceil((float(o.max() - o.min())) / s - _SPAN_ROUNDING)) for o, s in ((u, spacing[0]),
                                                                                           (v, spacing[1]))]
    size = (columns + extra[0], rows + extra[1])
    check_size((n_slices, size[1], size[0]), path, max_voxels)
    start = (float(u.min()), float(v.min()))
    fill = float(array.min())
    out = np.empty((n_slices, size[1], size[0]), dtype=np.float32)  # holds 16-bit values exactly, in half the memory
    for k in range(n_slices):
        image = sitk.GetImageFromArray(array[k].astype(np.float32))
        image.SetSpacing(spacing[:2])
        image.SetOrigin((float(u[k]), float(v[k])))
        out[k] = sitk.GetArrayFromImage(sitk.Resample(
            image, size, sitk.Transform(2, sitk.sitkIdentity), sitk.sitkLinear, start, spacing[:2], (1, 0, 0, 1),
            fill, sitk.sitkFloat32,
        ))
    if np.issubdtype(array.dtype, np.integer):  # integer HU stay integers: interpolated values rounded
        np.rint(out, out=out)  # in place: no second float copy of the volume
    origin = positions[0] + start[0] * row_dir + start[1] * col_dir
    shift = float(np.hypot(u, v).max())
    what = (f"gantry tilt of {tilt_degrees(positions, direction[:, 2]):.1f} degrees: slices shifted by up to "
            f"{shift:.2f} mm within their planes onto a regular grid of {size[0]} x {size[1]} pixels "
            f"(was {columns} x {rows}), linear interpolation")
    return out.astype(array.dtype), tuple(float(x) for x in origin), what  # type: ignore[return-value]


def resample_spacing(
    array: np.ndarray, distances: np.ndarray, spacing: tuple[float, float, float], path: str
) -> tuple[np.ndarray, str]:
    """(array, what was done in words) of the (k, j, i) ``array`` whose slice k lies ``distances[k]`` mm along the
    normal (sorted), resampled onto ``spacing[2]`` mm steps from its first slice (``spacing[2]``: ITK's, first to last
    slice over n - 1). SimpleITK interpolates, through a displacement field that carries each output slice to where its
    position lies in the acquired stack, as Slicer's grid transform carries each volume slice to its acquired one."""
    if array.ndim != 3:
        raise ImagingError("an unevenly spaced colour series cannot be regularized: only grey images are resampled",
                           path)
    n_slices, rows, columns = array.shape
    dz = spacing[2]
    relative = distances - distances[0]
    grid = dz * np.arange(n_slices)
    # Each output slice's position as a fractional index into the acquired stack (linear between acquired slices):
    # only where to sample, in the slice-index frame below where input slice k lies at k * dz; SimpleITK samples.
    acquired_index = np.interp(grid, relative, np.arange(n_slices))
    field = np.zeros((n_slices, 2, 2, 3))  # one vector per slice corner, as Slicer's grid transform has
    field[..., 2] = ((acquired_index - np.arange(n_slices)) * dz)[:, None, None]
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.SetSpacing((columns * spacing[0], rows * spacing[1], dz))  # its 2 x 2 corners hold every voxel
    # The input in its own type (SimpleITK interpolates in double whatever it is) and the float output converted
    # through a view, straight into the result: no float copies of the volume beside SimpleITK's output.
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    resampled = sitk.Resample(
        image, image, sitk.DisplacementFieldTransform(displacement), sitk.sitkLinear, float(array.min()),
        sitk.sitkFloat32,
    )
    del image
    values = sitk.GetArrayViewFromImage(resampled)
    out = np.empty(array.shape, array.dtype)
    if np.issubdtype(array.dtype, np.integer):  # integer HU stay integers: interpolated values rounded
        np.rint(values, out=out, casting="unsafe")
    else:
        out[...] = values
    steps = np.diff(relative)
    what = (f"uneven slice spacing (steps of {steps.min():.3f} to {steps.max():.3f} mm): {n_slices} slices "
            f"interpolated onto an evenly spaced grid of {dz:.4f} mm from the first slice to the last, acquired "
            f"slices up to {float(np.abs(relative - grid).max()):.3f} mm off it, linear interpolation")
    return out, what
