"""Names, colours and standard terminology for the regions the engine labels.

The engine's labels are free text taken from the answer ("left kidney", "the liver", "Lesions"). This module turns
them into what a Slicer segment needs: a display name, a colour, and (for common structures) a coded terminology
entry so that exports (DICOM SEG, ``.seg.nrrd``) carry SNOMED CT codes instead of only a word.

Only the standard library: it runs inside 3D Slicer's Python and in headless tests alike.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "PALETTE",
    "TERMINOLOGY_CONTEXT",
    "TERMINOLOGY_FILE",
    "TISSUE",
    "UNCODED",
    "Term",
    "colour_for",
    "display_name",
    "normalise_label",
    "term_for",
    "terminology_entry",
    "terminology_json",
]

# Slicer's serialised TerminologyEntry: context~category~type~type modifier~anatomic context~region~region modifier,
# each code as scheme^value^meaning ("^^" when absent). The same layout as vtkSegment's default tag value.
# Our own context, shipped as Resources/<TERMINOLOGY_FILE> (written by ``terminology_json``) and loaded by the module:
# Slicer's lists lack "Lesion" and call the tumour "Neoplasm", so entries in their context found no match.
TERMINOLOGY_CONTEXT = "Segmentation category and type - MedSIGHT"
TERMINOLOGY_FILE = "SegmentationCategoryTypeModifier-MedSIGHT.term.json"
_CATEGORY_CONTEXT = TERMINOLOGY_CONTEXT
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
_EMPTY_CODE = "^^"

# Twelve well-separated colours (RGB 0..1), chosen to stay readable over grey CT/MR and against each other.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.24),
    (0.18, 0.55, 0.85),
    (0.30, 0.75, 0.35),
    (0.95, 0.75, 0.15),
    (0.62, 0.35, 0.80),
    (0.10, 0.75, 0.75),
    (0.95, 0.50, 0.10),
    (0.85, 0.35, 0.65),
    (0.55, 0.80, 0.20),
    (0.40, 0.45, 0.95),
    (0.75, 0.55, 0.35),
    (0.95, 0.40, 0.45),
)


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme designator, code value and meaning (as in DICOM)."""

    scheme: str
    value: str
    meaning: str

    def serialise(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> Code | None:
        """The code of a "scheme^value^meaning" field, or None when it is empty or has no code value."""
        fields = text.split("^")
        if len(fields) != 3 or not fields[1]:
            return None
        return cls(*fields)


@dataclass(frozen=True)
class Term:
    """A segment's terminology: category, type, optional type modifier (laterality) and anatomic region."""

    category: Code
    type: Code
    modifier: Code | None = None
    anatomic_region: Code | None = None

    def entry(self) -> str:
        """The string Slicer stores in the segment's "TerminologyEntry" tag."""
        return "~".join(
            (
                _CATEGORY_CONTEXT,
                self.category.serialise(),
                self.type.serialise(),
                self.modifier.serialise() if self.modifier else _EMPTY_CODE,
                _ANATOMIC_CONTEXT,
                self.anatomic_region.serialise() if self.anatomic_region else _EMPTY_CODE,
                _EMPTY_CODE,
            )
        )

    @classmethod
    def parse(cls, entry: str) -> Term | None:
        """The terminology of a "TerminologyEntry" tag (any context), or None unless category and type are coded."""
        parts = (entry or "").split("~")
        codes = [Code.parse(part) for part in parts[:6]] + [None] * (6 - len(parts[:6]))
        if codes[1] is None or codes[2] is None:
            return None
        return cls(codes[1], codes[2], codes[3], codes[5])


TISSUE = Code("SCT", "85756007", "Tissue")
#: The terminology of a segment nobody coded (and of an entry ``Term.parse`` cannot read): generic tissue.
UNCODED = Term(TISSUE, TISSUE)


_ANATOMY = Code("SCT", "123037004", "Anatomical Structure")
_ALTERED = Code("SCT", "49755003", "Morphologically Altered Structure")
_LEFT = Code("SCT", "7771000", "Left")
_RIGHT = Code("SCT", "24028007", "Right")

_TYPES: dict[str, tuple[Code, Code]] = {
    "liver": (_ANATOMY, Code("SCT", "10200004", "Liver")),
    "spleen": (_ANATOMY, Code("SCT", "78961009", "Spleen")),
    "kidney": (_ANATOMY, Code("SCT", "64033007", "Kidney")),
    "pancreas": (_ANATOMY, Code("SCT", "15776009", "Pancreas")),
    "stomach": (_ANATOMY, Code("SCT", "69695003", "Stomach")),
    "aorta": (_ANATOMY, Code("SCT", "15825003", "Aorta")),
    "lung": (_ANATOMY, Code("SCT", "39607008", "Lung")),
    "heart": (_ANATOMY, Code("SCT", "80891009", "Heart")),
    "brain": (_ANATOMY, Code("SCT", "12738006", "Brain")),
    # DICOM CID 7140 (brain structures for volumetric measurement) codes.
    "grey matter": (_ANATOMY, Code("SCT", "40146001", "Cerebral gray matter")),
    "white matter": (_ANATOMY, Code("SCT", "68523003", "Cerebral white matter")),
    "tumour": (_ALTERED, Code("SCT", "108369006", "Tumor")),
    "lesion": (_ALTERED, Code("SCT", "52988006", "Lesion")),
}

# Spelling variants and plurals the model writes, mapped to the table's keys.
_SYNONYMS: dict[str, str] = {
    "kidneys": "kidney",
    "lungs": "lung",
    "gray matter": "grey matter",
    "tumor": "tumour",
    "tumors": "tumour",
    "tumours": "tumour",
    "lesions": "lesion",
}

_ARTICLES = re.compile(r"^(the|a|an)\s+")
#: Structures that come in left and right: only their entries carry a laterality modifier, and the terminology file
#: lists the modifiers for exactly these (Slicer's picker and DICOM SEG readers look a modifier up there).
_PAIRED = ("kidney", "lung", "grey matter", "white matter")


def normalise_label(label: str) -> str:
    """Lower-case, single-spaced, without a leading article or trailing punctuation: the key labels group by."""
    text = " ".join(str(label or "").replace("_", " ").split()).lower()
    text = text.strip(" .,;:!?\"'()[]")
    return _ARTICLES.sub("", text)


def display_name(label: str, fallback: str = "Region") -> str:
    """The segment name for a label: normalised, first letter capitalised ("left kidney" -> "Left kidney")."""
    text = normalise_label(label)
    if not text:
        return fallback
    return text[0].upper() + text[1:]


def term_for(label: str) -> Term | None:
    """The terminology of a known structure (with laterality for "left/right ..." of a paired one), else None."""
    key = normalise_label(label)
    side = re.match(r"^(left|right)\s+(.+)$", key)
    if side:
        key = side.group(2)
    key = _SYNONYMS.get(key, key)
    if key not in _TYPES:
        return None
    category, type_code = _TYPES[key]
    modifier = None
    if side and key in _PAIRED:
        modifier = _LEFT if side.group(1) == "left" else _RIGHT
    return Term(category, type_code, modifier)


def terminology_entry(label: str) -> str | None:
    """Slicer's TerminologyEntry tag string for a known label, else None."""
    term = term_for(label)
    return term.entry() if term else None


def colour_for(label: str, avoid: Iterable[tuple[float, float, float]] = ()) -> tuple[float, float, float]:
    """A stable palette colour for a label, skipping colours in ``avoid`` while the palette has others left.

    The start index is a CRC of the normalised label (Python's ``hash`` is salted per process, so it would give a
    structure a different colour in every session).
    """
    avoided = {tuple(round(c, 3) for c in colour) for colour in avoid}
    start = zlib.crc32(normalise_label(label).encode("utf-8")) % len(PALETTE)
    for step in range(len(PALETTE)):
        colour = PALETTE[(start + step) % len(PALETTE)]
        if tuple(round(c, 3) for c in colour) not in avoided:
            return colour
    return PALETTE[start]


def _code_json(code: Code) -> dict:
    return {"CodingSchemeDesignator": code.scheme, "CodeValue": code.value, "CodeMeaning": code.meaning}


def terminology_json() -> dict:
    """The terminology context of every structure ``term_for`` knows, in Slicer's .term.json layout."""
    categories: dict[Code, list[dict]] = {}
    for key, (category, type_code) in _TYPES.items():
        rgb = [round(c * 255) for c in colour_for(key)]
        entry = {**_code_json(type_code), "recommendedDisplayRGBValue": rgb, "3dSlicerLabel": key}
        if key in _PAIRED:
            entry["Modifier"] = [{**_code_json(side), "3dSlicerLabel": f"{side.meaning.lower()} {key}",
                                  "recommendedDisplayRGBValue": rgb} for side in (_RIGHT, _LEFT)]
        categories.setdefault(category, []).append(entry)
    return {
        "SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
        "SegmentationCodes": {"Category": [
            {**_code_json(category), "showAnatomy": False, "Type": types} for category, types in categories.items()
        ]},
    }


def terminology_text() -> str:
    """``terminology_json`` as the shipped file's text."""
    return json.dumps(terminology_json(), indent=2) + "\n"
