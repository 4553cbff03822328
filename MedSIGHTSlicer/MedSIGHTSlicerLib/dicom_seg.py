"""DICOM SEG export of the user's segmentation, referencing the DICOM series its volume was loaded from.

Slicer's DICOM loader records the series' SOP Instance UIDs on the volume node (attribute ``DICOM.instanceUIDs``)
and its database maps each UID to a file; `source_files` follows that path. `export_dicom_seg` then checks that the
volume's voxel grid is exactly the series' grid (same slices, rows, columns and positions: a resampled or cropped
volume cannot be referenced frame by frame) and writes a binary SEG with highdicom: one segment per Slicer segment
(overlaps allowed), names, colours, SNOMED terminology from the segment's ``TerminologyEntry`` tag, and the
algorithm recorded as MedSIGHT for segments that came from the model (manual for the user's own).

Needs ``highdicom`` (installed into Slicer on first use, after asking) and ``pydicom`` (shipped with Slicer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .export import ExportError, _require_segments
from .geometry import ijk_to_ras, segment_array
from .seg_writer import SegmentInfo, SegWriteError, order_sources, write_seg
from .suggestions import TAG_MODEL, TAG_REGION_CODE, get_tag

__all__ = ["INSTANCE_UIDS_ATTRIBUTE", "MODALITY_TAG", "dicom_modality", "export_dicom_seg", "source_files"]

#: The volume node attribute Slicer's DICOM scalar volume plugin sets: space-separated SOP Instance UIDs.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: DICOM Modality, as Slicer's database names a tag (``ctkDICOMDatabase.instanceValue(uid, tag)``).
MODALITY_TAG = "0008,0060"


def dicom_modality(volume_node, database) -> str | None:
    """The DICOM Modality (0008,0060: "CT", "MR", ...) of a volume loaded from DICOM, read through Slicer's DICOM
    database; None for any other volume, or when the database cannot tell."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids or database is None:
        return None
    value = str(database.instanceValue(uids[0], MODALITY_TAG) or "").strip().upper()
    return value if re.fullmatch(r"[A-Z0-9]{1,16}", value) else None


def source_files(volume_node, database, long_path: Callable[[str], str] = str) -> list[Path]:
    """The DICOM files of ``volume_node``'s series, via Slicer's DICOM database (``slicer.dicomDatabase``).

    ``long_path`` is ``slicer.util.longPath``: the database stores plain paths, and on Windows a file deeper than
    260 characters (a database under a long folder: each instance sits below its study and series UIDs) is found
    and opened only with the ``\\\\?\\`` prefix it adds, as Slicer's own DICOMUtils does before reading one. It is
    used only for a file not found as stored: it prefixes every absolute path, and a network path
    (``\\\\server\\share\\...``, a database's files imported in place) with it names no file.
    """
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise ExportError(
            f"{volume_node.GetName()!r} was not loaded from DICOM, so a DICOM SEG has no images to reference; "
            "export .seg.nrrd or NIfTI instead"
        )
    if database is None:
        raise ExportError("Slicer's DICOM database is not open: open the DICOM module once, then export again")
    files = [_found(database.fileForInstance(uid), long_path) for uid in uids]
    missing = sum(1 for f in files if not f or not Path(f).is_file())
    if missing:
        raise ExportError(f"{missing} of the {len(uids)} source DICOM files are no longer in the DICOM database")
    return [Path(f) for f in files]


def _found(path: str, long_path: Callable[[str], str]) -> str:
    """``path`` when it names a file, else ``long_path(path)`` when that does, else ``path`` ("" stays "")."""
    if not path or Path(path).is_file():
        return path
    longer = long_path(path)
    return longer if Path(longer).is_file() else path


def _segment_arrays(segmentation_node, volume_node) -> list[tuple[object, np.ndarray]]:
    """(segment, (K, J, I) bool array on the volume's grid) for every segment, in the segmentation's order."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [(segmentation.GetSegment(ids.GetValue(n)), segment_array(segmentation_node, ids.GetValue(n), volume_node))
            for n in range(ids.GetNumberOfValues())]


def export_dicom_seg(
    segmentation_node,
    volume_node,
    sources: Sequence[str | Path],
    path: str | Path,
    series_description: str = "MedSIGHT segmentation",
    series_number: int = 9901,
    version: str = "1",
) -> Path:
    """Write every segment of ``segmentation_node`` as a binary DICOM SEG referencing ``sources``. Returns ``path``.

    ``sources`` are the DICOM files ``volume_node`` was loaded from (see `source_files`); empty segments are
    skipped (one would be a described segment with no frames: a finding a viewer lists with nothing to show) and an
    all-empty segmentation is refused, as the engine's ``write_dicom_seg`` does (test_dicom_seg checks both).
    """
    try:
        import highdicom  # noqa: F401 - missing: a plain message now, not a traceback later
        import pydicom
    except ImportError as exc:
        raise ExportError(f"DICOM SEG export needs highdicom and pydicom ({exc})") from exc

    path = Path(path)
    if path.suffix.lower() != ".dcm":
        raise ExportError(f"{path.name}: a DICOM SEG file name must end in .dcm")
    _require_segments(segmentation_node)  # the other formats' words (none of its segments is "empty" then)
    try:
        datasets = [pydicom.dcmread(str(f)) for f in sources]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(f"cannot read the source DICOM images ({exc})") from exc
    try:
        ordered = order_sources(datasets, ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions())
        arrays = _segment_arrays(segmentation_node, volume_node)
        segments = [(s, a) for s, a in arrays if a.any()]
        if not segments:
            raise ExportError(
                f"nothing to export: the {len(arrays)} segment(s) of {segmentation_node.GetName()!r} are all empty, "
                "and a DICOM SEG holds only segments with voxels (paint or accept suggestions first; .seg.nrrd "
                "keeps empty segments)")
        infos = [SegmentInfo(s.GetName(), tuple(s.GetColor()), get_tag(s, "TerminologyEntry") or "",
                             get_tag(s, TAG_MODEL), get_tag(s, TAG_REGION_CODE)) for s, _ in segments]
        return write_seg(ordered, [a for _, a in segments], infos, path, series_description, series_number, version)
    except SegWriteError as exc:
        raise ExportError(str(exc)) from None
