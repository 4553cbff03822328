"""DICOM SEG (binary or fractional) through highdicom, referencing the source images; and reading one."""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from medsight._version import __version__
from medsight.atomic_files import replace_file
from medsight.naming import Code, Term

from .errors import ImagingError
from .labelmap import Segment, Segmentation
from .volume import Volume, volume_from_affine

#: DICOM's LO (Long String), the Segment Label's VR: at most 64 characters, and "\\" separates values.
LO_MAX = 64
#: SpecificCharacterSet for UTF-8: a label in any script, not only the source images' (often Latin-1) one.
UTF8 = "ISO_IR 192"


def _concept(c: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)


def _lab(color: tuple[float, float, float]) -> hd.color.CIELabColor:
    return hd.color.CIELabColor.from_rgb(*(round(float(c) * 255) for c in color))


def segment_label(name: str, number: int) -> str:
    """A segment name as a valid Segment Label: a "\\" would split it into two values, so it becomes "/", and a
    name longer than LO allows is cut (a name may be the model's whole phrase). The module's ``seg_writer`` labels
    alike (contract test)."""
    return (name or f"Segment {number}").replace("\\", "/")[:LO_MAX]


def _description(number: int, s: Segment) -> hd.seg.SegmentDescription:
    t = s.terminology
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment_label(s.name, number),
        segmented_property_category=_concept(t.category),
        segmented_property_type=_concept(t.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="MedSIGHT", family=codes.cid7162.ArtificialIntelligence, version=__version__
        ),
        # The model's region code travels as the tracking ID, so a SEG can be matched to an answer; a segment
        # without one has none (as the Slicer module writes it), else reading back takes the name for a code.
        tracking_id=s.region_code or None,
        tracking_uid=hd.UID() if s.region_code else None,
        anatomic_regions=[_concept(t.anatomic_region)] if t.anatomic_region else None,
        display_color=_lab(s.color),
    )
    if t.modifier:
        # highdicom has no argument for it; DICOM nests the modifier in the property type's code item.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(t.modifier)]
    return description


def _code(item) -> Code:
    return Code(str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))


#: Patient and study attributes highdicom copies from the source images into a SEG. DICOM makes them Type 2 (present,
#: possibly empty) in an image, but anonymizers often delete them outright; highdicom then fails ("'FileDataset'
#: object has no attribute 'PatientID'"). A source without one gets it empty, as DICOM allows and as the SEG then says.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime")


def reference_problem(ref: Volume) -> str | None:
    """Why a DICOM SEG cannot reference ``ref``'s source images (None when it can): they lack the study or frame of
    reference a SEG repeats; or ``ref`` is one multi-frame source whose frames
    are referenced through functional groups, which only enhanced images (CT, MR, PET, ...) have, not RT Dose. A
    volume resampled from its images (a regularized gantry tilt or uneven spacing) lies on another grid than its
    frames: refused too."""
    missing = [name for name, uid in (("StudyInstanceUID", ref.study_uid),
                                      ("FrameOfReferenceUID", ref.frame_of_reference_uid)) if not uid]
    if missing:  # a SEG must name its study and lie in its images' frame of reference (Type 1): nothing to fill in
        return f"the source images have no {' or '.join(missing)}, which a DICOM SEG must repeat"
    if ref.resampled:
        return (f"the volume was resampled from its DICOM images ({ref.resampled}), and a DICOM SEG must lie on "
                "their grid")
    if len(ref.source_files) != 1 or len(ref.frame_numbers) < 2:
        return None
    try:
        ds = pydicom.dcmread(ref.source_files[0], stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        return f"cannot re-read the source image ({exc})"
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    sop = ds.get("SOPClassUID")
    return (f"a DICOM SEG can reference the frames of a multi-frame image only with functional groups (an enhanced "
            f"image); this {getattr(sop, 'name', sop) or 'image'} has none")


def _segments_with_voxels(seg: Segmentation, fractional: bool, path: str) -> list[Segment]:
    """The segments a DICOM SEG holds: those with a voxel (binary) or a probability above 0 (fractional), as the
    Slicer module's export keeps them (contract test). An empty one would be a described segment with no frames, a
    finding a PACS viewer lists with nothing to show; a SEG with none at all says nothing and is refused."""
    if fractional and seg.probabilities:
        kept = [s for s in seg.segments if seg.probabilities[s.label].any()]
    else:
        kept = [s for s in seg.segments if (seg.labelmap == s.label).any()]
    if not kept:
        raise ImagingError(
            f"nothing to export: the {len(seg.segments)} segment(s) are all empty, and a DICOM SEG holds only "
            "segments with voxels (.seg.nrrd and NIfTI keep empty segments)",
            path,
        )
    return kept


def write_dicom_seg(
    seg: Segmentation,
    path: str | os.PathLike[str],
    fractional: bool = False,
    series_number: int = 9901,
    series_description: str = "MedSIGHT segmentation",
) -> str:
    """Write a DICOM SEG for ``seg`` referencing its source DICOM images; returns the path.

    The reference volume must come from DICOM (a series folder or one multi-frame file). Segments without voxels
    are left out (numbers count the kept ones from 1), and a segmentation without any is refused.
    ``fractional`` needs probabilities (``SegmentationBuilder.build(keep_probabilities=True)``).
    """
    path = os.fspath(path)
    ref = seg.reference
    if not ref.source_files or not ref.has_patient_geometry:
        raise ImagingError(
            "a DICOM SEG needs a reference volume read from DICOM images with patient geometry", ref.source
        )
    if not seg.segments:
        raise ImagingError("nothing to export: the segmentation has no segments", path)
    problem = reference_problem(ref)
    if problem:
        raise ImagingError(problem, ref.source)
    if fractional and not seg.probabilities:
        raise ImagingError("fractional SEG needs probabilities: build(keep_probabilities=True)", path)
    segments = _segments_with_voxels(seg, fractional, path)
    try:
        sources = [pydicom.dcmread(f) for f in ref.source_files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ImagingError(f"cannot re-read the source images ({exc})", ref.source) from exc
    for source in sources:
        for name in TYPE2_COPIED:
            if name not in source:
                setattr(source, name, "")
    if fractional:
        stack = np.stack([seg.probabilities[s.label].astype(np.float32) / 255.0 for s in segments], -1)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        stack = np.stack([seg.labelmap == s.label for s in segments], -1).astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    if len(sources) == 1 and ref.frame_numbers:
        # A multi-frame source: put our position-sorted slices back in the file's frame order.
        frames = np.empty_like(stack)
        frames[np.asarray(ref.frame_numbers) - 1] = stack
        stack = frames
    elif len(sources) != stack.shape[0]:
        raise ImagingError(f"{len(sources)} source images for {stack.shape[0]} slices", ref.source)
    try:
        out = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=stack,
            segmentation_type=seg_type,
            segment_descriptions=[_description(n + 1, s) for n, s in enumerate(segments)],
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MedSIGHT",
            manufacturer_model_name="MedSIGHT for 3D Slicer",
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description,
            content_label="MEDSIGHT",
            max_fractional_value=255,
        )
        if not all(s.name.isascii() for s in segments):
            # highdicom copies the source images' character set; one that cannot hold a name (Latin-1 and "肝")
            # would write "?" in its place. Every other text is a Python str, so UTF-8 holds it too.
            out.SpecificCharacterSet = UTF8
        replace_file(Path(path), out.save_as)  # whole or not at all: a failed write keeps the old file
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        raise ImagingError(f"cannot build the DICOM SEG ({exc})", path) from exc
    return path


def _segments_of(dseg: hd.seg.Segmentation) -> list[Segment]:
    segments = []
    for d in dseg.SegmentSequence:
        rgb = (0.5, 0.5, 0.5)
        if "RecommendedDisplayCIELabValue" in d:
            rgb = tuple(
                c / 255
                for c in hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb()
            )
        cat, typ = d.SegmentedPropertyCategoryCodeSequence[0], d.SegmentedPropertyTypeCodeSequence[0]
        modifiers = typ.get("SegmentedPropertyTypeModifierCodeSequence") or []
        regions = d.get("AnatomicRegionSequence") or []
        segments.append(
            Segment(
                label=int(d.SegmentNumber),
                name=str(d.SegmentLabel),
                color=rgb,  # type: ignore[arg-type]
                region_code=str(d.TrackingID) if "TrackingID" in d else None,
                terminology=Term(
                    _code(cat),
                    _code(typ),
                    anatomic_region=_code(regions[0]) if regions else None,
                    modifier=_code(modifiers[0]) if modifiers else None,
                ),
            )
        )
    return segments


def _check_referenced(dseg: hd.seg.Segmentation, reference: Volume, path: str) -> None:
    """Every image of ``reference`` must be one the SEG references: else highdicom's error speaks of its own
    API ("assert_missing_frames_are_empty") and ours of a grid, while the SEG was made on other images."""
    refs = dseg.get_source_image_uids()
    known = {sop for _, _, sop in refs}
    missing = [uid for uid in reference.sop_instance_uids if uid not in known]
    if missing:
        seg_series = ", ".join(sorted({series for _, series, _ in refs})) or "none"
        raise ImagingError(
            f"the SEG does not reference {len(missing)} of the reference's {len(reference.sop_instance_uids)} "
            f"images: it was made on series {seg_series}, the reference is series {reference.series_uid}", path
        )


def read_dicom_seg(path: str | os.PathLike[str], reference: Volume | None = None) -> Segmentation:
    """Read a DICOM SEG into a labelmap (label = segment number).

    With ``reference`` (the source series or multi-frame image as a Volume) frames are placed by the source images they
    reference, exactly on its grid (a reference resampled from its images, `Volume.resampled`, is refused: its slices
    are not those images); without, on the SEG's own plane positions (it must form a regular stack, possibly in
    another slice order than the source). Fractional SEGs are thresholded at 0.5
    and keep their probabilities; overlapping binary segments are refused.
    """
    path = os.fspath(path)
    try:
        dseg = hd.seg.segread(path)
    except (OSError, ValueError, TypeError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise ImagingError(f"unreadable DICOM SEG ({exc})", path) from exc
    segments = _segments_of(dseg)
    numbers = [s.label for s in segments]
    try:
        if reference is not None:
            if reference.resampled:  # its slice k is not the image the SEG's frames for slice k were drawn on
                raise ImagingError(
                    f"the reference volume was resampled from its DICOM images ({reference.resampled}), and a DICOM "
                    f"SEG lies on its source images' grid: its frames would be placed on interpolated slices; read "
                    f"the SEG without a reference (on its own plane positions)", path)
            frames = len(reference.frame_numbers)
            multiframe = len(reference.sop_instance_uids) == 1 and frames == reference.shape[0] > 1
            if len(reference.sop_instance_uids) != reference.shape[0] and not multiframe:
                raise ImagingError("reference must be a DICOM series or one multi-frame image", reference.source)
            _check_referenced(dseg, reference, path)
            if multiframe:  # the frames in our (position) order, as write_dicom_seg references them
                per_seg = dseg.get_pixels_by_source_frame(
                    reference.sop_instance_uids[0], list(reference.frame_numbers), segment_numbers=numbers,
                    dtype=np.float32,
                )
            else:
                per_seg = dseg.get_pixels_by_source_instance(
                    list(reference.sop_instance_uids), segment_numbers=numbers, dtype=np.float32
                )
            volume = reference.with_array(np.zeros(reference.shape, np.uint8), modality="SEG")
        else:
            hvol = dseg.get_volume(segment_numbers=numbers, dtype=np.float32)
            per_seg = np.asarray(hvol.array)
            # highdicom's affine maps (slice, row, column) indices; ours maps (column, row, slice).
            ijk_to_lps = np.asarray(hvol.affine, dtype=float)[:, [2, 1, 0, 3]]
            ref_series = dseg.get("ReferencedSeriesSequence")
            volume = volume_from_affine(
                per_seg[..., 0],
                ijk_to_lps,
                modality="SEG",
                source=path,
                series_uid=str(ref_series[0].SeriesInstanceUID) if ref_series else None,
                frame_of_reference_uid=str(dseg.FrameOfReferenceUID),
            )
    except ImagingError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as exc:
        raise ImagingError(f"DICOM SEG frames do not map onto a regular 3D grid ({exc})", path) from exc
    on = per_seg >= 0.5
    if on.sum(-1).max(initial=0) > 1 and dseg.SegmentationType == "BINARY":
        raise ImagingError("overlapping segments cannot share one labelmap", path)
    best = np.argmax(np.where(on, per_seg, -1.0), axis=-1)
    labelmap = np.where(on.any(-1), np.asarray(numbers)[best], 0)
    labelmap = labelmap.astype(np.uint8 if max(numbers, default=0) < 256 else np.uint16)
    probs = None
    if dseg.SegmentationType == "FRACTIONAL":
        probs = {n: np.rint(per_seg[..., i] * 255).astype(np.uint8) for i, n in enumerate(numbers)}
    volume.array = labelmap
    return Segmentation(volume, labelmap, segments, probs)
