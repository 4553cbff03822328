"""The DICOM SEG itself, from plain arrays and the source datasets (no MRML): highdicom on both API generations.

Slicer 5.8 and 5.10 bundle pydicom 2.4, which only highdicom 0.22 supports; Slicer builds with pydicom 3 get 0.23 or
later (see ``packages.dicom_seg_requirements``). 0.22 has no ``CIELabColor.from_rgb`` and no ``display_color``
argument, so there the colour is converted with Pillow's colour management (lcms, D50 white: within a few CIELab
units of highdicom's D65 conversion) and set on the segment description directly. 0.22 also predates NumPy 2, which
Slicer 5.10 bundles with pydicom 2.4 (see ``_numpy1_alias``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .naming import UNCODED, Code, Term

__all__ = [
    "SegWriteError", "SegmentInfo", "display_colour", "order_sources", "write_seg",
]

#: Millimetres a slice may sit off its DICOM image position and still be the same slice.
POSITION_TOLERANCE_MM = 0.01
#: DICOM's LO (Long String), the Segment Label's VR: at most 64 characters, and "\\" separates values.
LO_MAX = 64
#: SpecificCharacterSet for UTF-8: a label in any script, not only the source images' (often Latin-1) one.
UTF8 = "ISO_IR 192"
#: Patient and study attributes highdicom copies from the source images into a SEG (0.22 and 0.23+ alike). DICOM
#: makes them Type 2 (present, possibly empty) in an image, but anonymizers often delete them outright; highdicom then
#: fails ("'FileDataset' object has no attribute 'PatientID'"). The in-memory datasets get them empty, as DICOM allows;
#: the files stay as they are. The engine's export_dicom_seg.TYPE2_COPIED (contract test: the same).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime")
#: What a SEG must repeat from its images (Type 1): an image without one leaves nothing to fill in.
UIDS_REPEATED = ("StudyInstanceUID", "FrameOfReferenceUID")


class SegWriteError(ValueError):
    """The SEG cannot be written (the message says why, for the user)."""


@dataclass
class SegmentInfo:
    """One segment as the SEG describes it."""

    name: str
    colour: tuple[float, float, float]  # RGB, 0..1
    terminology: str = ""  # Slicer's TerminologyEntry tag
    model: str | None = None  # set for segments that came from the model
    region_code: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def display_colour(colour: Sequence[float]) -> Any:
    """A highdicom CIELabColor for an RGB colour in 0..1, on either highdicom generation."""
    import highdicom as hd

    rgb = tuple(min(max(round(float(c) * 255), 0), 255) for c in colour)
    from_rgb = getattr(hd.color.CIELabColor, "from_rgb", None)
    if from_rgb is not None:
        return from_rgb(*rgb)
    from PIL import Image, ImageCms

    transform = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lightness, a, b = ImageCms.applyTransform(Image.new("RGB", (1, 1), rgb), transform).getpixel((0, 0))
    # lcms' 8-bit Lab: L* 0..100 as 0..255, a* and b* offset by 128.
    return hd.color.CIELabColor(lightness * 100.0 / 255.0, float(a) - 128.0, float(b) - 128.0)


def _description(number: int, info: SegmentInfo, version: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    # Generic "Tissue", no modifier and no region unless the entry codes category and type (as the engine reads it).
    entry = Term.parse(info.terminology) or UNCODED
    from_model = info.model is not None or info.region_code is not None
    arguments = dict(
        segment_number=number,
        segment_label=segment_label(info.name, number),
        segmented_property_category=_concept(entry.category),
        segmented_property_type=_concept(entry.type),
        # Suggested by the model and accepted by the user: semi-automatic. The user's own drawing: manual.
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if from_model
                        else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=(info.model or "MedSIGHT")[:64], family=codes.cid7162.ArtificialIntelligence, version=version
        ) if from_model else None,
        tracking_id=info.region_code or None,
        tracking_uid=hd.UID() if info.region_code else None,
        anatomic_regions=[_concept(entry.anatomic_region)] if entry.anatomic_region else None,
    )
    colour = display_colour(info.colour)
    if "display_color" in inspect.signature(hd.seg.SegmentDescription.__init__).parameters:
        description = hd.seg.SegmentDescription(**arguments, display_color=colour)
    else:
        description = hd.seg.SegmentDescription(**arguments)  # highdicom 0.22
        description.RecommendedDisplayCIELabValue = list(colour.value)
    if entry.modifier:
        # highdicom has no argument for it; DICOM nests the modifier in the property type's code item.
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [_concept(entry.modifier)]
    return description


def segment_label(name: str, number: int) -> str:
    """A segment name as a valid Segment Label: a "\\" would split it into two values, so it becomes "/", and a
    name longer than LO allows is cut (a segment's name may be the model's whole phrase, or anything typed)."""
    return (name or f"Segment {number}").replace("\\", "/")[:LO_MAX]


def _concept(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def order_sources(datasets: list, ijk_to_ras: np.ndarray, dims_ijk: Sequence[int]) -> list:
    """The datasets in the volume's slice order (k = 0, 1, ...); refuses any grid that is not the series' grid, and
    images without the study or frame of reference a SEG must repeat (before any segment is read)."""
    missing = [name for name in UIDS_REPEATED if any(not str(ds.get(name, "") or "").strip() for ds in datasets)]
    if missing:
        raise SegWriteError(f"the source DICOM images have no {' or '.join(missing)}, which a DICOM SEG must repeat: "
                            "export .seg.nrrd or NIfTI instead")
    frames = int(datasets[0].get("NumberOfFrames", 1) or 1) if len(datasets) == 1 else 1
    if frames > 1:  # else the count below would read as files missing from the series
        raise SegWriteError(
            f"the volume comes from one multi-frame DICOM image ({frames} frames), and this export references the "
            "images of a single-frame series only: export .seg.nrrd or NIfTI instead"
        )
    if len(datasets) != dims_ijk[2]:
        raise SegWriteError(f"the volume has {dims_ijk[2]} slices but its DICOM series has {len(datasets)} images")
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=float)  # IJK -> LPS
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    row_dir, col_dir = m[:3, 0] / spacing[0], m[:3, 1] / spacing[1]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    ordered = []
    for k in range(dims_ijk[2]):
        origin = (m @ [0, 0, k, 1])[:3]
        distance = np.linalg.norm(positions - origin, axis=1)
        best = int(np.argmin(distance))
        if distance[best] > POSITION_TOLERANCE_MM:
            raise SegWriteError(
                f"slice {k} of the volume lies {distance[best]:.2f} mm from the nearest DICOM image: the volume was "
                "resampled or cropped after loading, so a DICOM SEG cannot reference it; export .seg.nrrd instead"
            )
        ds = datasets[best]
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        if (int(ds.Columns), int(ds.Rows)) != tuple(dims_ijk[:2]) or not (
            np.allclose(orientation[:3], row_dir, atol=1e-4) and np.allclose(orientation[3:], col_dir, atol=1e-4)
        ):
            raise SegWriteError(f"slice {k}: the volume's rows, columns or orientation differ from its DICOM image")
        # A volume whose pixel spacing was changed (Volumes module) keeps its slice origins: the SEG would stretch
        # the masks onto the image's grid, so its far pixels must still land on the image's own.
        dy, dx = (float(v) for v in ds.PixelSpacing)
        off = max(abs(spacing[0] - dx) * (dims_ijk[0] - 1), abs(spacing[1] - dy) * (dims_ijk[1] - 1))
        if off > POSITION_TOLERANCE_MM:
            raise SegWriteError(
                f"slice {k}: the volume's pixel spacing ({spacing[0]:.4g} x {spacing[1]:.4g} mm) is not its DICOM "
                f"image's ({dx:.4g} x {dy:.4g} mm): the volume was resampled or edited after loading, so a DICOM SEG "
                "cannot reference it; export .seg.nrrd instead"
            )
        ordered.append(ds)
    return ordered


@contextlib.contextmanager
def _numpy1_alias(highdicom_version: str) -> Iterator[None]:
    """``np.float_`` (float64) while highdicom 0.22 builds a SEG under NumPy 2. It names that alias, which NumPy 2
    removed, on every segment: each DICOM SEG export in Slicer 5.10 (NumPy 2.0.2, pydicom 2.4.4) failed with
    "`np.float_` was removed in the NumPy 2.0 release". No highdicom release supports both pydicom 2 and NumPy 2, so
    the alias is lent for the call only, and only to highdicom before 0.23."""
    old = tuple(int(p) for p in highdicom_version.split(".")[:2] if p.isdigit()) < (0, 23)
    lend = old and "float_" not in vars(np)
    if lend:
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if lend:
            del np.float_


def write_seg(ordered: list, masks: Sequence[np.ndarray], infos: Sequence[SegmentInfo], path: str | Path,
              series_description: str = "MedSIGHT segmentation", series_number: int = 9901,
              version: str = "1") -> Path:
    """A binary SEG of (K, J, I) boolean ``masks`` on the grid of ``ordered`` (one dataset per k). Returns ``path``.

    Datasets of ``ordered`` without one of `TYPE2_COPIED` get it empty (in memory only)."""
    import highdicom as hd

    path = Path(path)
    # (K, J, I) per segment -> (frames, rows, columns, segments); the volume's j axis is the image row.
    stack = np.stack([np.asarray(m, dtype=bool) for m in masks], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    for ds in ordered:
        for name in TYPE2_COPIED:
            if name not in ds:
                setattr(ds, name, "")
    try:
        with _numpy1_alias(hd.__version__):
            seg = hd.seg.Segmentation(
                source_images=ordered,
                pixel_array=stack,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[_description(n + 1, info, version) for n, info in enumerate(infos)],
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
        if not all(info.name.isascii() and (info.model or "").isascii() for info in infos):
            # highdicom copies the source images' character set; one that cannot hold a name or a model's name
            # (Latin-1 and "肝") would write "?" in its place. Every other text is a Python str, so UTF-8 holds it too.
            seg.SpecificCharacterSet = UTF8
        seg.save_as(str(path))
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        raise SegWriteError(f"cannot build the DICOM SEG ({exc})") from exc
    return path
