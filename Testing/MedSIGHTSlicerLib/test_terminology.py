"""Every terminology entry the module writes is found by Slicer's terminology logic (slicer-core) once the shipped
.term.json is loaded: "Lesion" and "Tumor" included, which Slicer's own lists lack (issue 18, smaller points)."""

from __future__ import annotations

from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from MedSIGHTSlicerLib.naming import (  # noqa: E402
    _TYPES,
    TERMINOLOGY_CONTEXT,
    TERMINOLOGY_FILE,
    colour_for,
    term_for,
    terminology_entry,
    terminology_text,
)

SHIPPED = Path(__file__).resolve().parents[2] / "MedSIGHTSlicer" / "Resources" / TERMINOLOGY_FILE


def test_shipped_file_is_the_generated_one():
    assert SHIPPED.read_text() == terminology_text(), "regenerate it from naming.terminology_text()"


@pytest.mark.parametrize("label", [*_TYPES, "left kidney", "right lung", "left white matter", "tumors", "Lesions"])
def test_entries_are_found_by_slicer(label):
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(SHIPPED)) == TERMINOLOGY_CONTEXT
    entry = slicer.vtkSlicerTerminologyEntry()
    serialised = terminology_entry(label)
    assert serialised and logic.DeserializeTerminologyEntry(serialised, entry)
    assert entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT
    assert logic.UpdateEntryFromLoadedTerminologies(entry, [], [])
    # Found in the file: its recommended colour was filled in (an unknown code keeps Slicer's grey 127, 127, 127).
    key = next(k for k, (_, code) in _TYPES.items() if code == term_for(label).type)
    expected = tuple(round(c * 255) for c in colour_for(key))
    assert tuple(entry.GetTypeObject().GetRecommendedDisplayRGBValue()) == expected
