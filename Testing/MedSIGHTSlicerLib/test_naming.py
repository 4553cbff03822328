"""naming.py: display names, stable distinct colours and Slicer TerminologyEntry strings."""

from __future__ import annotations

import pytest

from MedSIGHTSlicerLib.naming import (
    _TYPES,
    PALETTE,
    colour_for,
    display_name,
    normalise_label,
    term_for,
    terminology_entry,
    terminology_json,
)


@pytest.mark.parametrize(
    ("label", "name"),
    [("liver", "Liver"), ("  the Left   kidney. ", "Left kidney"), ("grey_matter", "Grey matter"), ("", "Region")],
)
def test_display_name(label, name):
    assert display_name(label) == name


def test_fallback_and_normalise():
    assert display_name("", fallback="[M0_3]") == "[M0_3]"
    assert normalise_label("The LUNGS!") == "lungs"


def test_liver_entry_has_slicer_format():
    entry = terminology_entry("liver")
    assert entry == (
        "Segmentation category and type - MedSIGHT"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert len(entry.split("~")) == 7


def test_laterality_and_synonyms():
    left = term_for("left kidney")
    assert left.type.value == "64033007" and left.modifier.meaning == "Left"
    assert term_for("right lung").modifier.value == "24028007"
    assert term_for("lungs").type.meaning == "Lung" and term_for("lungs").modifier is None
    assert term_for("gray matter") == term_for("grey matter")
    assert term_for("tumor").category.meaning == "Morphologically Altered Structure"
    assert term_for("lesions").type.value == "52988006"
    assert "~SCT^7771000^Left~" in terminology_entry("Left kidney")


def test_every_laterality_written_is_listed_in_the_terminology_file():
    """Slicer's terminology picker and DICOM SEG readers look a type modifier up in the context: one the file does not
    list for that type leaves the segment's laterality unreadable."""
    listed = {(t["CodeValue"], m["CodeValue"]) for c in terminology_json()["SegmentationCodes"]["Category"]
              for t in c["Type"] for m in t.get("Modifier", [])}
    written = {(term.type.value, term.modifier.value) for key in _TYPES for side in ("left", "right")
               if (term := term_for(f"{side} {key}")).modifier is not None}
    assert written == listed
    assert {key for key in _TYPES if term_for(f"left {key}").modifier} == {"kidney", "lung", "grey matter",
                                                                           "white matter"}
    assert term_for("left liver").modifier is None and term_for("left liver").type == term_for("liver").type


@pytest.mark.parametrize(
    "label",
    [
        "liver",
        "spleen",
        "kidney",
        "pancreas",
        "stomach",
        "aorta",
        "lung",
        "heart",
        "brain",
        "grey matter",
        "white matter",
        "tumour",
        "lesion",
    ],
)
def test_every_table_label_is_coded(label):
    term = term_for(label)
    assert term is not None and term.type.scheme == "SCT" and term.type.value.isdigit()


def test_unknown_label_has_no_terminology():
    assert term_for("left femur") is None
    assert terminology_entry("something odd") is None


def test_colours_are_stable_and_avoid_used_ones():
    assert colour_for("liver") == colour_for(" The liver ")
    assert colour_for("liver") in PALETTE
    used = [colour_for("liver")]
    assert colour_for("liver", avoid=used) != used[0]
    picked = []
    for _ in range(len(PALETTE)):
        picked.append(colour_for("x", avoid=picked))
    assert len(set(picked)) == len(PALETTE)
    assert colour_for("x", avoid=picked) in PALETTE  # palette exhausted: still a colour
