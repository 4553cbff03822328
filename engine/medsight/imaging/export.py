"""The one suffix -> writer table of the engine: every caller that writes a segmentation by file name uses it."""

from __future__ import annotations

import os
from collections.abc import Callable

from medsight.atomic_files import written_file

from .errors import ImagingError
from .export_dicom_seg import reference_problem, write_dicom_seg
from .export_nifti import write_nifti_labelmap
from .export_nrrd import write_seg_nrrd
from .labelmap import Segmentation
from .volume import Volume

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


def check_reference(path: str | os.PathLike[str], reference: Volume) -> None:
    """Refuse, before any work, a DICOM SEG file name for a volume that a DICOM SEG cannot reference (the test
    `write_dicom_seg` makes when it writes)."""
    if writer_for(path) is not write_dicom_seg:
        return
    others = ", ".join(s for s, w in WRITERS if w is not write_dicom_seg)
    if not (reference.source_files and reference.has_patient_geometry):
        raise ImagingError("a DICOM SEG (.dcm) needs an input read from DICOM images with patient geometry; "
                           f"use {others} for {reference.source}", os.fspath(path))
    problem = reference_problem(reference)
    if problem:
        raise ImagingError(f"{problem}; use {others}", os.fspath(path))


def make_parent_folder(path: str | os.PathLike[str]) -> None:
    """Create the missing folders above ``path`` (segmentations and overlay PNGs alike); for a symbolic link, above
    its target, where the file is written."""
    parent = written_file(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a folder should be
        raise ImagingError(f"cannot create the folder {parent} ({exc.strerror})", os.fspath(path)) from exc


def write_segmentation(seg: Segmentation, path: str | os.PathLike[str]) -> None:
    """Write ``seg`` in the format its file name asks for (3D Slicer .seg.nrrd, NIfTI + JSON, DICOM SEG), creating
    missing folders."""
    writer = writer_for(path)
    make_parent_folder(path)
    writer(seg, os.fspath(path))
