"""`read_volume`: one entry point that picks the reader from the path."""

from __future__ import annotations

import os

from .errors import ImagingError, not_a_file
from .read_dicom import read_dicom_file, read_dicom_series
from .read_files import read_image2d, read_nifti, read_nrrd
from .read_metaimage import read_metaimage
from .volume import MAX_VOXELS, Volume

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise ImagingError(f"unreadable file ({exc})", path) from exc
    return head[128:132] == b"DICM"


def read_volume(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    modality: str | None = None,
    max_voxels: int = MAX_VOXELS,
    regularize_tilt: bool = False,
    regularize_spacing: bool = False,
) -> Volume:
    """Read a DICOM folder or file, NIfTI, NRRD, MetaImage or 2D picture into a `Volume`.

    ``modality`` (CT, MR, US, ...) overrides the file's own; formats without one default to "OT".
    ``regularize_tilt``: resample a gantry-tilted DICOM series onto a regular grid instead of refusing it;
    ``regularize_spacing``: the same for a DICOM series with unevenly spaced slices (a missing slice, a drifting step).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_dicom_series(path, series_uid=series_uid, modality=modality, max_voxels=max_voxels,
                                 regularize_tilt=regularize_tilt, regularize_spacing=regularize_spacing)
    if not os.path.isfile(path):
        raise not_a_file(path, missing="no such file or folder")
    low = path.lower()
    if low.endswith((".nii", ".nii.gz", ".hdr", ".img")):
        return read_nifti(path, modality=modality, max_voxels=max_voxels)
    if low.endswith((".nrrd", ".nhdr")):
        return read_nrrd(path, modality=modality, max_voxels=max_voxels)
    if low.endswith((".mha", ".mhd")):
        return read_metaimage(path, modality=modality, max_voxels=max_voxels)
    if low.endswith(_IMAGE_SUFFIXES):
        return read_image2d(path, modality=modality, max_voxels=max_voxels)
    if low.endswith(".dcm") or _is_dicom(path):
        return read_dicom_file(path, modality=modality, max_voxels=max_voxels)
    raise ImagingError("unsupported file type (expected DICOM, NIfTI, NRRD, MetaImage, PNG, JPG or TIFF)", path)
