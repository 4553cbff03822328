"""The in-Slicer self-test's golden case, replayed headless: the same NRRD, the same Lib path, a live demo engine.

The self-test (MedSIGHTSlicer/Testing/Python) loads ``golden/ct_phantom.nrrd`` in Slicer, asks the embedded demo
model ``golden.json``'s question through the module's logic and compares the suggested segment with the stored
masks (Dice >= 0.99). This test does the same with slicer-core's MRML and a real server, so the golden files are
known to be right on every CI run, not only inside the Slicer application.

Re-record after the demo model changes: ``MEDSIGHT_RECORD_GOLDEN=1 pytest Testing/MedSIGHTSlicerLib/
test_self_test_golden.py`` (rewrites golden.json; with no NRRD yet it also writes the phantom from the demo data
builder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import medsight  # noqa: E402
import medsight.server.app  # noqa: E402
from medsight.server.rle import encode_mask  # noqa: E402
from medsight_testing.live_server import live_server  # noqa: E402
from MedSIGHTSlicerLib.client import MedSIGHTClient  # noqa: E402
from MedSIGHTSlicerLib.geometry import volume_upload_arrays  # noqa: E402
from MedSIGHTSlicerLib.rle import decode_mask  # noqa: E402
from MedSIGHTSlicerLib.suggestions import SuggestionManager  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "MedSIGHTSlicer" / "Testing" / "Python" / "golden"
RECORD = os.environ.get("MEDSIGHT_RECORD_GOLDEN") == "1"
DICE_MIN = 0.99
QUESTION = "Please segment the liver."
OPTIONS = {"max_new_tokens": 48, "seed": 0}


def write_phantom(path: Path) -> None:
    """Three axial slices through the liver of one seeded demo CT phantom (HU, int16, LPS geometry)."""
    import SimpleITK as sitk  # noqa: N813

    from medsight.demo.sources import make_ct_phantom

    phantom = make_ct_phantom(np.random.default_rng(2026))
    liver = phantom.masks["liver"].sum(axis=(1, 2))
    k = int(np.argmax(liver))
    vol = phantom.volume
    image = sitk.GetImageFromArray(np.round(vol.array[k - 1 : k + 2]).astype(np.int16))
    image.SetSpacing(vol.spacing)
    image.SetOrigin(tuple(float(v) for v in vol.ijk_to_lps @ [0, 0, k - 1, 1])[:3])
    image.SetDirection(tuple(float(v) for v in np.asarray(vol.direction).reshape(-1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_nrrd(scene, path: Path):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("MedSIGHT golden CT")
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"cannot read {path}"
    return node


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.fixture(scope="module")
def demo_url():
    with live_server(medsight.server.app.create_app(medsight.Engine.load("demo", device="cpu"))) as base_url:
        yield base_url


def test_golden_case_through_the_lib_path(demo_url):
    spec_path = GOLDEN / "golden.json"
    volume_path = GOLDEN / "ct_phantom.nrrd"
    if RECORD and not volume_path.exists():
        write_phantom(volume_path)
    spec = {} if RECORD else json.loads(spec_path.read_text())
    client = MedSIGHTClient(demo_url, timeout=300)
    scene = slicer.vtkMRMLScene()
    node = read_nrrd(scene, volume_path)
    array, spacing, origin, direction = volume_upload_arrays(node)
    info = client.upload_volume(array, spacing, origin, direction, modality="CT")
    question, options, index = spec.get("question", QUESTION), spec.get("options", OPTIONS), spec.get("slice", 1)
    result = client.ask(info.volume_id, question, indices=[index], options=options)
    answer = result.answers[0]
    manager = SuggestionManager(scene, node, model=result.model)
    manager.add_answers([a for a in result.answers if a.regions], question=question, model=result.model)
    placed = np.zeros(array.shape, bool)
    for segment_id in manager.suggestion_ids():
        placed |= manager.suggestion_mask(segment_id)

    if RECORD:
        spec = {"model": client.model_card().name, "device": "cpu", "volume_file": volume_path.name,
                "modality": "CT", "volume_id": info.volume_id, "question": question, "slice": index,
                "options": options, "answer": answer.text,
                "regions": [{"index": r.index, "code": r.code, "label": r.label, "mask": encode_mask(r.mask)}
                            for r in answer.regions]}
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")

    assert client.model_card().name == spec["model"]
    assert info.volume_id == spec["volume_id"], "the NRRD's voxels or geometry changed since the recording"
    assert answer.text == spec["answer"]
    assert [(r.index, r.code) for r in answer.regions] == [(g["index"], g["code"]) for g in spec["regions"]]
    expected = np.zeros(array.shape, bool)
    for region, golden in zip(answer.regions, spec["regions"], strict=True):
        mask = decode_mask(golden["mask"])
        assert dice(region.mask, mask) >= DICE_MIN
        expected[index] |= mask
    # The suggested segments hold the same voxels, on slice k = index of the node; and the case is not trivial.
    assert dice(placed, expected) >= DICE_MIN
    assert expected.sum() >= 100, "the golden liver mask should be a real region, not a speck"


def test_self_test_skips_without_an_engine_under_slicers_ctest_runner(monkeypatch):
    """ctest runs the self-test through ``slicer.testing.runUnitTest``: ``unittest.TestLoader().loadTestsFromName``,
    which calls each test_* method after setUp (never runTest). With nothing listening at MEDSIGHT_TEST_URL and no
    MEDSIGHT_TEST_SERVE, every test must skip with the reason, not error (the extension build machines' case)."""
    import sys
    import types
    import unittest

    from medsight_testing.live_server import free_port

    # slicer-core has MRML but not the application's Python pieces: a real scene for setUp's Clear, and Slicer's
    # ScriptedLoadableModuleTest reduced to what the self-test uses of it (a TestCase with delayDisplay).
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):  # noqa: N802 - Slicer's name
            pass

    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setenv("MEDSIGHT_TEST_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.delenv("MEDSIGHT_TEST_SERVE", raising=False)
    monkeypatch.syspath_prepend(str(GOLDEN.parent))
    monkeypatch.delitem(sys.modules, "MedSIGHTSlicerSelfTest", raising=False)  # read the URL afresh

    suite = unittest.TestLoader().loadTestsFromName("MedSIGHTSlicerSelfTest")
    result = unittest.TestResult()
    suite.run(result)
    assert result.testsRun == 2
    assert result.errors == [] and result.failures == []
    assert len(result.skipped) == 2
    assert all("no MedSIGHT engine at http://127.0.0.1:" in reason for _, reason in result.skipped)
    assert result.wasSuccessful()
    monkeypatch.delitem(sys.modules, "MedSIGHTSlicerSelfTest", raising=False)
