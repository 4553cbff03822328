"""The one suffix -> writer table of the engine: every caller that writes a segmentation by file name uses it."""

from __future__ import annotations

import os
from collections.abc import Callable

from .errors import ImagingError
from .export_dicom_seg import write_dicom_seg
from .export_nifti import write_nifti_labelmap
from .export_nrrd import write_seg_nrrd
from .labelmap import Segmentation

#: File-name endings and their writers, most specific first (".nii.gz" before ".nii" would not matter, but
#: ".seg.nrrd" is a compound suffix).
WRITERS = ((".seg.nrrd", write_seg_nrrd), (".nii.gz", write_nifti_labelmap), (".nii", write_nifti_labelmap),
           (".dcm", write_dicom_seg))


def writer_for(path: str | os.PathLike[str]) -> Callable[[Segmentation, str], object]:
    """The writer a file name asks for; an ImagingError lists the known endings (callers check before work)."""
    name = os.fspath(path).lower()
    for suffix, writer in WRITERS:
        if name.endswith(suffix):
            return writer
    raise ImagingError(f"unknown segmentation format; use {', '.join(s for s, _ in WRITERS)}", os.fspath(path))


def write_segmentation(seg: Segmentation, path: str | os.PathLike[str]) -> None:
    """Write ``seg`` in the format its file name asks for (3D Slicer .seg.nrrd, NIfTI + JSON, DICOM SEG)."""
    writer_for(path)(seg, os.fspath(path))
