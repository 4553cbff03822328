"""NIfTI labelmap with a JSON sidecar describing the labels (names, colours, codes, source)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medsight.atomic_files import replace_files, written_file
from medsight.naming import TISSUE, Code, Term

from .errors import ImagingError
from .labelmap import Segment, Segmentation
from .read_files import read_nifti
from .volume import Volume

SIDECAR_FORMAT = "medsight-labels/1"


def sidecar_path(nifti_path: str) -> str:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json``."""
    base = nifti_path[:-7] if nifti_path.lower().endswith(".nii.gz") else os.path.splitext(nifti_path)[0]
    return base + ".json"


def written_sidecar_path(nifti_path: str | os.PathLike[str]) -> str:
    """Where a labelmap written to ``nifti_path`` gets its sidecar: beside a symbolic link's target (the labelmap
    lands there; beside the link, the target kept its old sidecar under the new labelmap), else beside it."""
    return sidecar_path(os.fspath(written_file(nifti_path)))


def _code_dict(c: Code | None) -> dict[str, str] | None:
    return None if c is None else {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}


def _code_from(d: dict[str, str] | None) -> Code | None:
    return None if not d else Code(scheme=d["scheme"], value=d["value"], meaning=d["meaning"])


def _header_xforms(ref: Volume) -> tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]]:
    """The input NIfTI's qform and sform with their codes (its space: scanner, aligned, MNI152, ...), so the mask
    overlays its image in every viewer; code 1 (scanner) for other inputs (DICOM, NRRD), or when the grid no
    longer is the one those transforms describe."""
    scanner = ((ref.ijk_to_ras, 1), (ref.ijk_to_ras, 1))
    if ref.nifti_xforms is None:
        return scanner
    (qform, q_code), (sform, s_code) = ref.nifti_xforms
    if not q_code and not s_code and np.allclose(ref.origin, 0) and np.allclose(ref.direction, np.eye(3)):
        return (qform, 0), (sform, 0)  # no space at all (the grid ITK gives it): viewers place mask and image alike
    used = sform if s_code else qform  # the one nibabel, and so this Volume, took
    if not np.allclose(used, ref.ijk_to_ras, atol=1e-4):
        return scanner
    return (qform, q_code), (sform, s_code)


def write_nifti_labelmap(seg: Segmentation, path: str | os.PathLike[str]) -> tuple[str, str]:
    """Write the labelmap (``.nii`` or ``.nii.gz``) and its ``.json`` sidecar; returns both paths."""
    path = os.fspath(path)
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise ImagingError("a NIfTI labelmap must end in .nii or .nii.gz", path)
    ref = seg.reference
    dtype = np.uint8 if seg.labelmap.max(initial=0) < 256 else np.uint16
    img = nib.Nifti1Image(np.transpose(seg.labelmap, (2, 1, 0)).astype(dtype), ref.ijk_to_ras)
    (qform, q_code), (sform, s_code) = _header_xforms(ref)
    img.set_sform(sform, code=s_code)
    img.set_qform(qform, code=q_code)
    img.header.set_xyzt_units("mm")
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    sidecar = {
        "format": SIDECAR_FORMAT,
        "labels": [
            {
                "value": s.label,
                "name": s.name,
                "color": [float(c) for c in s.color],
                "region_code": s.region_code,
                "terminology": {
                    "category": _code_dict(s.terminology.category),
                    "type": _code_dict(s.terminology.type),
                    "anatomic_region": _code_dict(s.terminology.anatomic_region),
                    "modifier": _code_dict(s.terminology.modifier),
                },
            }
            for s in seg.segments
        ],
        "reference": {
            "series_uid": ref.series_uid,
            "study_uid": ref.study_uid,
            "frame_of_reference_uid": ref.frame_of_reference_uid,
            "modality": ref.modality,
        },
        "ijk_to_ras": ref.ijk_to_ras.tolist(),
    }
    json_path = written_sidecar_path(path)
    suffix = ".nii.gz" if path.lower().endswith(".nii.gz") else ".nii"  # nibabel picks the format by the name
    try:
        # Both whole or neither: an interrupted or failed write keeps the labelmap and sidecar it would replace.
        replace_files([(Path(path), lambda target: nib.save(img, target), suffix),
                       (Path(json_path), lambda target: target.write_text(json.dumps(sidecar, indent=2),
                                                                          encoding="utf-8"), "")])
    except OSError as exc:
        raise ImagingError(f"cannot write labelmap ({getattr(exc, 'strerror', None) or exc})", path) from exc
    return path, json_path


def read_nifti_labelmap(path: str | os.PathLike[str]) -> Segmentation:
    """Read a labelmap written by `write_nifti_labelmap` or by the Slicer module's NIfTI export (the same sidecar,
    `MedSIGHTSlicerLib.nifti_sidecar`). The sidecar sits next to it, or, for a symbolic link, next to its target
    (where the writer puts it). Files exported by earlier module versions, whose sidecar held only
    ``{"labels": {"<value>": "<name>"}}``, still read (names only)."""
    path = os.fspath(path)
    vol = read_nifti(path, modality="SEG")
    json_path = sidecar_path(path)
    if not os.path.exists(json_path):
        json_path = written_sidecar_path(path)  # a link: the writer put the sidecar beside its target
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
        if isinstance(meta.get("labels"), dict):  # an earlier Slicer module's sidecar: value -> name
            meta = {**meta, "labels": [{"value": int(k), "name": str(v), "color": (0.5, 0.5, 0.5),
                                        "terminology": {"category": None, "type": None}}
                                       for k, v in meta["labels"].items()]}
        segments = [
            Segment(
                label=int(d["value"]),
                name=str(d["name"]),
                color=tuple(d["color"]),
                region_code=d.get("region_code"),
                terminology=Term(
                    _code_from(d["terminology"]["category"]) or TISSUE,
                    _code_from(d["terminology"]["type"]) or TISSUE,
                    modifier=_code_from(d["terminology"].get("modifier")),
                    anatomic_region=_code_from(d["terminology"].get("anatomic_region")),
                ),
            )
            for d in meta["labels"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImagingError(f"missing or malformed label sidecar ({exc})", json_path) from exc
    if not np.issubdtype(vol.array.dtype, np.integer):
        raise ImagingError(f"labelmap voxels must be integers, got {vol.array.dtype}", path)
    ref = meta.get("reference", {})
    vol.series_uid = ref.get("series_uid")
    vol.frame_of_reference_uid = ref.get("frame_of_reference_uid")
    return Segmentation(
        vol, vol.array.astype(np.uint16 if vol.array.max(initial=0) > 255 else np.uint8), segments
    )
