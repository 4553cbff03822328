"""Readers for NIfTI (nibabel), NRRD incl. ``.seg.nrrd`` (pynrrd) and 2D PNG/JPG/TIFF (Pillow)."""

from __future__ import annotations

import os
import zlib

import nibabel as nib
import nrrd
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImagingError, not_a_file
from .volume import (
    LPS_TO_RAS,
    MAX_VOXELS,
    Volume,
    check_size,
    check_voxels,
    fill_nan,
    volume_from_affine,
    volume_from_ras,
)

_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nrrd.NRRDError,
    TypeError,
    IndexError,
)


def _exists(path: str) -> None:
    if not os.path.isfile(path):
        raise not_a_file(path)
    if os.path.getsize(path) == 0:  # each library words it its own way, pynrrd not at all (StopIteration)
        raise ImagingError("unreadable: empty file (0 bytes)", path)


def _squeeze_to_3d(shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """Allow trailing singleton axes (a 3D image saved as 1-frame 4D); refuse real 4D data."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) < 2:
        raise ImagingError(f"{len(shape)}D data (shape {shape}): an image needs 2 or 3 dimensions", path)
    if len(shape) > 3:
        if any(s != 1 for s in shape[3:]):
            raise ImagingError(
                f"{len(shape)}D data (shape {shape}): one 3D volume is expected; "
                "split time points or channels first",
                path,
            )
        shape = shape[:3]
    return shape


def _check_qform_sform(img: nib.Nifti1Image, shape: tuple[int, ...], path: str) -> None:
    """Refuse a header whose qform and sform both claim a place but disagree: nibabel (and so this reader) takes
    the sform, ITK (and so 3D Slicer) the qform unless the sform code is 1, so a mask written on one would sit
    millimetres away from the image shown with the other."""
    if not hasattr(img.header, "get_qform"):  # Analyze: neither
        return
    qform, q_code = img.header.get_qform(coded=True)
    sform, s_code = img.header.get_sform(coded=True)
    if not q_code or not s_code or int(s_code) == 1:  # sform code 1 (scanner): ITK takes the sform too
        return
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    gap = float(np.linalg.norm((qform - sform) @ corners, axis=0).max())
    voxel = float(np.linalg.norm(sform[:3, :3], axis=0).min())
    if gap > 0.01 * voxel:  # the qform's float32 quaternion rounds well below this
        raise ImagingError(
            f"the qform (code {int(q_code)}) and sform (code {int(s_code)}) place the voxels up to {gap:.3g} mm "
            "apart; viewers disagree on which to use: make them agree (or set one code to 0) first",
            path,
        )


def _check_pixdim(img: nib.Nifti1Image, path: str) -> None:
    """Refuse a header whose sform (the transform nibabel, and so this reader, takes) has other voxel sizes than
    pixdim: ITK (and so 3D Slicer) takes the sizes from pixdim, so the voxels, and masks, would land elsewhere."""
    if not hasattr(img.header, "get_qform") or not int(img.header["sform_code"]):
        return  # the qform is built from pixdim: they agree
    pixdim = np.abs(np.asarray(img.header["pixdim"][1:4], dtype=float))
    sizes = np.linalg.norm(img.header.get_sform()[:3, :3], axis=0)
    if not np.allclose(pixdim, sizes, rtol=1e-3, atol=1e-6):
        raise ImagingError(
            f"the header's voxel sizes (pixdim {np.round(pixdim, 6).tolist()} mm) and its sform's "
            f"({np.round(sizes, 6).tolist()} mm) disagree; viewers disagree on which to use: make them agree first",
            path,
        )


#: NIfTI spatial units (xyzt_units) that ITK, and so 3D Slicer, converts to millimetres, by these factors; nibabel's
#: affine ignores them.
_UNITS_IN_MM = {"meter": 1000.0, "micron": 0.001}


def _to_mm(header: nib.Nifti1Header) -> np.ndarray:
    """The 4x4 scaling of a NIfTI header's positions and voxel sizes to millimetres, as ITK applies it."""
    unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "unknown"
    return np.diag([_UNITS_IN_MM.get(unit, 1.0)] * 3 + [1.0])


def read_nifti(
    path: str | os.PathLike[str], modality: str | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read a NIfTI-1/2 file; scl_slope/inter applied; the sform/qform affine converted to LPS, in millimetres."""
    path = os.fspath(path)
    _exists(path)
    try:
        img = nib.load(path)
        if not isinstance(img, nib.spatialimages.SpatialImage):  # CIFTI-2: rows of brain surface vertices
            raise ImagingError(f"a {type(img).__name__.replace('Image', '')} file (shape {img.shape}) holds no "
                               "voxel grid in patient space; a NIfTI volume is expected", path)
        shape = _squeeze_to_3d(img.shape, path)
        check_size(shape, path, max_voxels)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=float)
        _check_qform_sform(img, shape, path)
    except ImagingError:
        raise
    except _READ_ERRORS as exc:
        raise ImagingError(f"unreadable or corrupt NIfTI ({exc})", path) from exc
    if data.dtype.names:  # NIfTI RGB24/RGBA32 are structured arrays: RGB24 is read as RGB, as ITK (3D Slicer) reads it
        if data.dtype.names != ("R", "G", "B"):
            raise ImagingError(f"colour NIfTI with samples {data.dtype.names} ({data.dtype}): RGB24 is expected", path)
        data = np.stack([data[name] for name in data.dtype.names], axis=-1).reshape((*shape, 3))
    elif np.iscomplexobj(data):  # MR raw data: nothing downstream (windows, the model) has a meaning for it
        raise ImagingError(f"complex-valued NIfTI ({data.dtype}); save its magnitude as a real image first", path)
    else:
        data = data.reshape(shape)
    data, nan_filled = fill_nan(data)
    check_voxels(data, path)
    kw = {"modality": (modality or "OT").upper(), "source": path}
    h = img.header
    is_nifti = hasattr(h, "get_qform")
    # A header in metres or microns: ITK (3D Slicer) scales it to mm, so the image lies there, and masks must too.
    to_mm = _to_mm(h)
    if not is_nifti or (not int(h["qform_code"]) and not int(h["sform_code"])):
        # Analyze, or NIfTI with neither transform in use: nibabel makes up an x-flipped grid centred on 0, ITK (and
        # so 3D Slicer) lays the voxel sizes along the LPS axes from 0. Take ITK's, or masks would sit flipped and
        # shifted in Slicer.
        zooms = [float(z) for z in h.get_zooms()[:3]] + [1.0] * (3 - len(h.get_zooms()[:3]))
        lps_grid = to_mm @ np.diag([*zooms, 1.0])
        vol = volume_from_ras(data, LPS_TO_RAS @ lps_grid, has_patient_geometry=False, **kw)
    else:
        vol = volume_from_ras(data, to_mm @ affine, **kw)
        _check_pixdim(img, path)  # after the shear check of volume_from_affine, which says more of a sheared sform
    vol.nan_filled = nan_filled
    if is_nifti:  # keep the header's spaces for masks written on it
        vol.nifti_xforms = ((to_mm @ h.get_qform(), int(h["qform_code"])),
                            (to_mm @ h.get_sform(), int(h["sform_code"])))
    return vol


#: NRRD kinds of a first axis holding a voxel's red, green and blue samples.
_COLOUR_KINDS = ("rgb-color", "3-color")

_SPACES = {
    "left-posterior-superior": np.eye(3),
    "lps": np.eye(3),
    "right-anterior-superior": LPS_TO_RAS[:3, :3],
    "ras": LPS_TO_RAS[:3, :3],
    "left-anterior-superior": np.diag([1.0, -1.0, 1.0]),
    "las": np.diag([1.0, -1.0, 1.0]),
}


def read_nrrd(
    path: str | os.PathLike[str], modality: str | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read a 3D NRRD (``.nrrd``, ``.nhdr``, ``.seg.nrrd`` single layer) with its LPS/RAS geometry."""
    path = os.fspath(path)
    _exists(path)
    try:
        header = nrrd.read_header(path)
    except _READ_ERRORS as exc:
        raise ImagingError(f"unreadable NRRD header ({exc})", path) from exc
    sizes = tuple(int(s) for s in header.get("sizes", ()))
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    if len(sizes) == 4 and kinds[0] in ("list", "vector") and any(k.startswith("Segment") for k in header):
        raise ImagingError(
            f"multi-layer segmentation ({sizes[0]} layers of overlapping segments): "
            "read each layer in Slicer or merge the segments first",
            path,
        )
    # A colour volume as 3D Slicer writes it (vtkTeemNRRDWriter): the samples on a first axis of kind RGB-color.
    colour = len(sizes) in (3, 4) and kinds[0] in _COLOUR_KINDS and sizes[0] == 3
    shape = _squeeze_to_3d(sizes[1:] if colour else sizes, path)
    check_size((*shape, 3) if colour else shape, path, max_voxels)
    try:
        data, header = nrrd.read(path, index_order="F")
    except KeyError as exc:  # pynrrd's word for a type it does not know
        raise ImagingError(f"unsupported NRRD type {header.get('type')!r}", path) from exc
    except _READ_ERRORS as exc:
        raise ImagingError(f"unreadable or corrupt NRRD data ({exc})", path) from exc
    if colour:
        if data.dtype != np.uint8:
            raise ImagingError(f"{header['kinds'][0]} samples of type {data.dtype}: 8-bit RGB is expected", path)
        array = np.ascontiguousarray(np.transpose(data.reshape((3, *shape), order="A"), (3, 2, 1, 0)))
    else:
        data = data.reshape(shape, order="A")
        array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    array, nan_filled = fill_nan(array)
    check_voxels(array, path)
    space = str(header.get("space", "")).lower()
    dirs = header.get("space directions")
    if not space and dirs is not None and int(header.get("space dimension", 0)) == 3:
        # No named space, but vectors and an origin: ITK (and so 3D Slicer) takes them as they stand, i.e. as LPS.
        space = "lps"
    is_seg = any(k.startswith("Segment") for k in header)
    kw = {"modality": (modality or ("SEG" if is_seg else "OT")).upper(), "source": path, "nan_filled": nan_filled}
    if space in _SPACES and dirs is not None:
        dirs = np.asarray(dirs, dtype=float)[1 if colour else 0: len(sizes)]  # the colour axis has "none"
        if dirs.shape[0] == 2:  # ITK (and so 3D Slicer) refuses it too: a plane in 3D space has no slice axis
            raise ImagingError("a 2D image placed in 3D space (2 space directions): not supported, as in ITK and 3D "
                               "Slicer; save it as a one-slice 3D NRRD", path)
        if dirs.shape[0] < 3 or not np.all(np.isfinite(dirs[:3])):
            raise ImagingError(f"malformed space directions {header.get('space directions')}", path)
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise ImagingError(f"malformed space origin {header.get('space origin')} (3 finite numbers expected)", path)
        to_lps = _SPACES[space]
        m = np.eye(4)
        m[:3, :3] = to_lps @ dirs[:3].T  # NRRD lists one vector per axis
        m[:3, 3] = to_lps @ origin
        return volume_from_affine(array, m, **kw)
    if space:
        raise ImagingError(f"unsupported NRRD space {space!r}", path)
    spacings = header.get("spacings")
    sp = tuple(float(s) for s in spacings[1 if colour else 0:][:3]) if spacings is not None else (1.0, 1.0, 1.0)
    return Volume(array=array, spacing=sp, has_patient_geometry=False, **kw)


def read_image2d(
    path: str | os.PathLike[str], modality: str | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read a PNG/JPG/TIFF/BMP picture as a one-slice volume without patient geometry.

    Grey stays grey (8 or 16 bit), colour becomes RGB; an alpha channel is accepted only if opaque.
    """
    path = os.fspath(path)
    _exists(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            check_size((h, w), path, max_voxels)
            if getattr(img, "n_frames", 1) > 1:
                raise ImagingError(f"{img.n_frames} pages/frames; one 2D image is expected", path)
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("L" if mode == "1" else "RGB")
            elif mode == "LA":
                img = img.convert("RGBA")
            array = np.asarray(img)
    except ImagingError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImagingError(f"unreadable or corrupt image ({exc})", path) from exc
    if array.ndim == 3 and array.shape[2] == 4:
        if np.any(array[..., 3] != 255):
            raise ImagingError("image has transparent pixels; flatten the alpha channel first", path)
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ImagingError(f"unsupported pixel layout {array.shape} (mode {mode})", path)
    array = np.ascontiguousarray(array)[None]
    check_voxels(array, path)
    return Volume(array=array, modality=(modality or "OT").upper(), source=path, has_patient_geometry=False)
