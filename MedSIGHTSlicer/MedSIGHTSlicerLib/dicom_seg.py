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

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .export import ExportError
from .geometry import ijk_to_ras, segment_array
from .suggestions import TAG_MODEL, TAG_REGION_CODE, get_tag

__all__ = ["INSTANCE_UIDS_ATTRIBUTE", "export_dicom_seg", "source_files"]

#: The volume node attribute Slicer's DICOM scalar volume plugin sets: space-separated SOP Instance UIDs.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: Millimetres a slice may sit off its DICOM image position and still be the same slice.
POSITION_TOLERANCE_MM = 0.01

_TISSUE = ("SCT", "85756007", "Tissue")


def source_files(volume_node, database) -> list[Path]:
    """The DICOM files of ``volume_node``'s series, via Slicer's DICOM database (``slicer.dicomDatabase``)."""
    uids = (volume_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise ExportError(
            f"{volume_node.GetName()!r} was not loaded from DICOM, so a DICOM SEG has no images to reference; "
            "export .seg.nrrd or NIfTI instead"
        )
    if database is None:
        raise ExportError("Slicer's DICOM database is not open: open the DICOM module once, then export again")
    files = [database.fileForInstance(uid) for uid in uids]
    missing = sum(1 for f in files if not f or not Path(f).is_file())
    if missing:
        raise ExportError(f"{missing} of the {len(uids)} source DICOM files are no longer in the DICOM database")
    return [Path(f) for f in files]


def _segment_arrays(segmentation_node, volume_node) -> list[tuple[object, np.ndarray]]:
    """(segment, (K, J, I) bool array on the volume's grid) for every segment, in the segmentation's order."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [(segmentation.GetSegment(ids.GetValue(n)), segment_array(segmentation_node, ids.GetValue(n), volume_node))
            for n in range(ids.GetNumberOfValues())]


def _ijk_to_lps(volume_node) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras(volume_node)


def _order_sources(datasets: list, volume_node) -> list:
    """The datasets in the volume's slice order (k = 0, 1, ...); refuses any grid that is not the series' grid."""
    dims = volume_node.GetImageData().GetDimensions()  # (I, J, K)
    if len(datasets) != dims[2]:
        raise ExportError(f"the volume has {dims[2]} slices but its DICOM series has {len(datasets)} images")
    m = _ijk_to_lps(volume_node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    row_dir, col_dir = m[:3, 0] / spacing[0], m[:3, 1] / spacing[1]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    ordered = []
    for k in range(dims[2]):
        origin = (m @ [0, 0, k, 1])[:3]
        distance = np.linalg.norm(positions - origin, axis=1)
        best = int(np.argmin(distance))
        if distance[best] > POSITION_TOLERANCE_MM:
            raise ExportError(
                f"slice {k} of the volume lies {distance[best]:.2f} mm from the nearest DICOM image: the volume was "
                "resampled or cropped after loading, so a DICOM SEG cannot reference it; export .seg.nrrd instead"
            )
        ds = datasets[best]
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        if (int(ds.Columns), int(ds.Rows)) != dims[:2] or not (
            np.allclose(orientation[:3], row_dir, atol=1e-4) and np.allclose(orientation[3:], col_dir, atol=1e-4)
        ):
            raise ExportError(f"slice {k}: the volume's rows, columns or orientation differ from its DICOM image")
        ordered.append(ds)
    return ordered


def _terminology(segment) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(category, type) codes from the segment's TerminologyEntry tag; generic "Tissue" when it has none."""
    entry = get_tag(segment, "TerminologyEntry") or ""
    parts = entry.split("~")

    def code(text: str) -> tuple[str, str, str] | None:
        fields = text.split("^")
        return (fields[0], fields[1], fields[2]) if len(fields) == 3 and all(fields) else None

    category = code(parts[1]) if len(parts) > 2 else None
    kind = code(parts[2]) if len(parts) > 2 else None
    return (category, kind) if category and kind else (_TISSUE, _TISSUE)


def _description(number: int, segment, version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind = _terminology(segment)
    model, region_code = get_tag(segment, TAG_MODEL), get_tag(segment, TAG_REGION_CODE)
    from_model = model is not None or region_code is not None
    colour = segment.GetColor()
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.GetName() or f"Segment {number}",
        segmented_property_category=hd.sr.CodedConcept(category[1], category[0], category[2]),
        segmented_property_type=hd.sr.CodedConcept(kind[1], kind[0], kind[2]),
        # Suggested by the model and accepted by the user: semi-automatic. The user's own drawing: manual.
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if from_model
                        else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=(model or "MedSIGHT")[:64], family=codes.cid7162.ArtificialIntelligence, version=version
        ) if from_model else None,
        tracking_id=region_code or None,
        tracking_uid=hd.UID() if region_code else None,
        display_color=hd.color.CIELabColor.from_rgb(*(round(float(c) * 255) for c in colour)),
    )


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
    skipped (a SEG segment needs at least one pixel) and an all-empty segmentation is refused.
    """
    try:
        import highdicom as hd
        import pydicom
    except ImportError as exc:
        raise ExportError(f"DICOM SEG export needs highdicom and pydicom ({exc})") from exc

    path = Path(path)
    if path.suffix.lower() != ".dcm":
        raise ExportError(f"{path.name}: a DICOM SEG file name must end in .dcm")
    try:
        datasets = [pydicom.dcmread(str(f)) for f in sources]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(f"cannot read the source DICOM images ({exc})") from exc
    ordered = _order_sources(datasets, volume_node)
    segments = [(s, a) for s, a in _segment_arrays(segmentation_node, volume_node) if a.any()]
    if not segments:
        raise ExportError("nothing to export: every segment is empty")
    # (K, J, I) per segment -> (frames, rows, columns, segments); the volume's j axis is the image row.
    stack = np.stack([a for _, a in segments], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        seg = hd.seg.Segmentation(
            source_images=ordered,
            pixel_array=stack,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(n + 1, s, version) for n, (s, _) in enumerate(segments)],
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MedSIGHT",
            manufacturer_model_name="MedSIGHT for 3D Slicer",
            software_versions=version,
            device_serial_number="0",
            series_description=series_description,
            content_label="MEDSIGHT",
        )
        seg.save_as(str(path))
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        raise ExportError(f"cannot build the DICOM SEG ({exc})") from exc
    return path
