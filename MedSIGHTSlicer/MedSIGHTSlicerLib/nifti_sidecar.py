"""The JSON sidecar beside an exported NIfTI labelmap: per label value its name, colour, region code and
terminology codes, plus the reference grid (NIfTI itself stores none of these).

The format is the engine's (``medsight.imaging.export_nifti``, ``"medsight-labels/1"``), so either side reads what
the other wrote; the module may not import the engine, so this is a copy that Testing/test_contracts.py holds to the
engine's writer and reader field by field. Standard library and numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .naming import UNCODED, Code, Term

__all__ = ["SIDECAR_FORMAT", "label_record", "sidecar", "sidecar_path"]

SIDECAR_FORMAT = "medsight-labels/1"


def sidecar_path(nifti_path: str | Path) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json``."""
    path = Path(nifti_path)
    name = path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(path.suffix)]
    return path.with_name(stem + ".json")


def _code(code: Code | None) -> dict[str, str] | None:
    return None if code is None else {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}


def label_record(value: int, name: str, colour: Sequence[float], terminology_entry: str | None,
                 region_code: str | None) -> dict[str, Any]:
    """One label: value, segment name, RGB colour (0..1), the model's region code and the codes of the segment's
    TerminologyEntry tag (generic "Tissue" when it has none, as in the engine)."""
    codes = Term.parse(terminology_entry or "") or UNCODED
    return {
        "value": int(value),
        "name": name,
        "color": [float(c) for c in colour],
        "region_code": region_code,
        "terminology": {"category": _code(codes.category), "type": _code(codes.type),
                        "anatomic_region": _code(codes.anatomic_region), "modifier": _code(codes.modifier)},
    }


def sidecar(labels: Sequence[dict[str, Any]], ijk_to_ras: Sequence[Sequence[float]], modality: str | None = None,
            series_uid: str | None = None, study_uid: str | None = None,
            frame_of_reference_uid: str | None = None) -> dict[str, Any]:
    """The whole sidecar document for `label_record` entries on a grid with 4x4 ``ijk_to_ras``."""
    return {
        "format": SIDECAR_FORMAT,
        "labels": list(labels),
        "reference": {
            "series_uid": series_uid,
            "study_uid": study_uid,
            "frame_of_reference_uid": frame_of_reference_uid,
            "modality": modality,
        },
        "ijk_to_ras": [[float(v) for v in row] for row in ijk_to_ras],
    }
