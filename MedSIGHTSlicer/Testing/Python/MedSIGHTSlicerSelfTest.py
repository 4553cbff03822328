"""In-Slicer self-test of MedSIGHT: sample data through the module's panel, and a stored golden mask.

Needs a MedSIGHT engine. It uses the one at MEDSIGHT_TEST_URL (default http://127.0.0.1:8765, token from
MEDSIGHT_TEST_TOKEN); when none answers and MEDSIGHT_TEST_SERVE holds a command (e.g.
"/path/to/.venv/bin/medsight serve --port 8765"), the test starts that engine and stops it after. With neither (an
extension build machine), it says so and passes: there is nothing to test against (each test method skips itself,
so also under Slicer's ctest runner, which calls the test_* methods rather than runTest).

The golden check is recorded for the embedded demo model on the CPU (greedy decoding): a CT phantom NRRD, "Please
segment the liver.", and the liver mask it gave. It pins the whole Slicer path (file -> node -> upload bytes and
geometry -> answer -> suggested segment voxels). With another model it is skipped, with a message; the rest still
runs.

Run it from Slicer's Python console::

    import runpy
    path = "/path/to/MedSIGHTSlicer/Testing/Python/MedSIGHTSlicerSelfTest.py"
    runpy.run_path(path)["MedSIGHTSlicerSelfTestTest"]().runTest()
"""

# ruff: noqa: N802 - unittest/Slicer method names and the file name are fixed

from __future__ import annotations

import json
import os
import time
import unittest
from pathlib import Path

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from MedSIGHTSlicerLib.chat_panel import parse_region_url
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError
from MedSIGHTSlicerLib.engine_launch import launch_plan, startup_environment
from MedSIGHTSlicerLib.engine_process import EngineProcess
from MedSIGHTSlicerLib.rle import decode_mask
from MedSIGHTSlicerLib.settings_page import settings_kept

ENGINE_URL = os.environ.get("MEDSIGHT_TEST_URL", "http://127.0.0.1:8765")
ENGINE_TOKEN = os.environ.get("MEDSIGHT_TEST_TOKEN") or None
ENGINE_COMMAND = os.environ.get("MEDSIGHT_TEST_SERVE", "")
STARTUP_TIMEOUT_S = 180.0
ANSWER_TIMEOUT_S = 300.0
DICE_MIN = 0.99
NO_ENGINE = f"no MedSIGHT engine at {ENGINE_URL} and no MEDSIGHT_TEST_SERVE to start one"

# -- the golden case --------------------------------------------------------------------------------------------
# golden/ct_phantom.nrrd (three axial slices of a seeded demo CT phantom) and golden/golden.json (question, options,
# the engine's volume id and the recorded masks as run lengths), recorded with the embedded demo model on the CPU.
# Testing/MedSIGHTSlicerLib/test_self_test_golden.py replays the same case headless on every CI run and re-records it.
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def golden_case() -> dict:
    return json.loads((GOLDEN_DIR / "golden.json").read_text())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap; two empty masks agree perfectly."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


class MedSIGHTSlicerSelfTestTest(ScriptedLoadableModuleTest):
    """Sample data through the module's user interface, then the golden mask through its logic."""

    engine: EngineProcess | None = None

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)
        self.client = MedSIGHTClient(ENGINE_URL, token=ENGINE_TOKEN, timeout=ANSWER_TIMEOUT_S)
        self.available = self._ensure_engine()

    def tearDown(self) -> None:
        if self.engine is not None:
            self.engine.stop(wait=True)  # nothing polls it later
            type(self).engine = None

    def runTest(self) -> None:
        self.setUp()
        if not self.available:
            self.delayDisplay(f"MedSIGHT self-test skipped: {NO_ENGINE}")
            return
        try:
            self.test_sample_data_conversation()
            self.test_golden_mask()
        finally:
            self.tearDown()

    # -- helpers -------------------------------------------------------------------------------------------------
    def _require_engine(self) -> None:
        """Skip this test without an engine. Slicer's ctest runner (``slicer.testing.runUnitTest``, through
        ``unittest.TestLoader().loadTestsFromName``) calls each test_* method after setUp, never runTest, so every
        test that needs the engine checks for it itself."""
        if not self.available:
            raise unittest.SkipTest(NO_ENGINE)

    def _ensure_engine(self) -> bool:
        """True when an engine answers (started from MEDSIGHT_TEST_SERVE if needed); False when there is none."""
        try:
            self.client.health(timeout=5)
            return True
        except MedSIGHTError:
            if not ENGINE_COMMAND:
                return False
        engine = EngineProcess()
        engine.start(launch_plan(ENGINE_COMMAND, startup_environment(slicer.util), stop_on_exit=True))
        type(self).engine = engine
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            engine.poll()  # collects the engine's output
            try:
                self.client.health(timeout=2)
                return True
            except MedSIGHTError:
                time.sleep(0.5)
            if not engine.running:
                break
        raise AssertionError(f"the engine did not come up at {ENGINE_URL}: {engine.output[-1000:]}")

    def _pump_until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            slicer.app.processEvents()
            time.sleep(0.01)

    # -- tests ---------------------------------------------------------------------------------------------------
    def test_sample_data_conversation(self) -> None:
        """MRHead through the module panel: upload, streamed answer, suggestions, accept all."""
        self._require_engine()
        import SampleData

        self.delayDisplay("Loading sample data (MRHead)")
        node = SampleData.SampleDataLogic().downloadSample("MRHead")
        self.assertIsNotNone(node)

        slicer.util.selectModule("MedSIGHTSlicer")
        widget = slicer.modules.medsightslicer.widgetRepresentation().self()
        # From Slicer's Python console the settings are the user's own: their engine address is theirs again after.
        with settings_kept(widget.connection_form, widget._connect):
            widget.ui.urlLineEdit.text = ENGINE_URL
            widget.ui.tokenLineEdit.text = ENGINE_TOKEN or ""
            widget._connect()
            widget.ui.inputVolumeSelector.setCurrentNode(node)
            panel = widget.panel
            panel.options = {"max_new_tokens": 24, "no_code_fallback": True, "seed": 0}
            panel.set_scope("current")

            self.delayDisplay("Asking through the conversation panel")
            panel.question.setPlainText("Where is the brain?")
            panel.send_button.click()
            self.assertTrue(panel.busy, panel.error.text)
            self._pump_until(lambda: not panel.busy, ANSWER_TIMEOUT_S, "the answer")
            self.assertEqual(panel.error.text, "", "the panel reported an error")
            self.assertIn("Where is the brain?", panel.conversation_text())
            self.assertTrue(panel.region_links(), "no region chips in the answer (no_code_fallback guarantees one)")

            manager = widget.logic.suggestion_manager(node)
            chips = [parse_region_url(link) for link in panel.region_links()]
            if any(panel.region(chip).mask.any() for chip in chips):
                self.assertTrue(manager.suggestion_ids(), "regions with voxels must become suggestions")

            # A second question must reuse the upload (the node's id is cached per node and voxel version).
            key = widget.logic.volume_key(node)
            self.assertIsInstance(widget.logic.volume_source(node), str, f"volume {key} was not cached")

            if manager.suggestion_ids():
                accepted = manager.accept()
                self.assertTrue(accepted)
                self.assertIsNotNone(manager.find_user_node())
                self.assertTrue(manager.undo())
        self.delayDisplay("Sample-data conversation passed")

    def test_golden_mask(self) -> None:
        """The stored golden case, through node -> upload -> ask -> suggested segment voxels."""
        self._require_engine()
        golden = golden_case()
        card = self.client.model_card(timeout=10)
        health = self.client.health(timeout=10)
        if card.name != golden["model"] or health.device != golden["device"]:
            self.delayDisplay(
                f"Golden mask check skipped: recorded for {golden['model']!r} on {golden['device']!r}, the engine "
                f"runs {card.name!r} on {health.device!r}"
            )
            return
        from MedSIGHTSlicer import MedSIGHTSlicerLogic

        logic = MedSIGHTSlicerLogic()
        logic.connect(ENGINE_URL, ENGINE_TOKEN, timeout=ANSWER_TIMEOUT_S)

        node = slicer.util.loadVolume(str(GOLDEN_DIR / golden["volume_file"]))
        node.SetAttribute("MedSIGHT.Modality", golden["modality"])
        volume_id = logic.upload(node)
        self.assertEqual(volume_id, golden["volume_id"], "the uploaded voxels or geometry differ from the recording")

        index = golden["slice"]
        result = logic.ask(node, golden["question"], [index], options=golden["options"])
        answer = result.answers[0]
        self.assertEqual(answer.index, index)
        self.assertEqual([(r.index, r.code) for r in answer.regions],
                         [(g["index"], g["code"]) for g in golden["regions"]])
        expected = np.zeros(slicer.util.arrayFromVolume(node).shape, dtype=bool)
        self.assertEqual(len(answer.regions), len(golden["regions"]))
        for region, recorded in zip(answer.regions, golden["regions"]):  # no strict=: Slicer 5.8 has Python 3.9
            mask = decode_mask(recorded["mask"])
            score = dice(region.mask, mask)
            self.assertGreaterEqual(score, DICE_MIN, f"region {region.index} ({region.code}): Dice {score:.3f}")
            expected[index] |= mask

        # The suggested segments hold the same voxels, on slice k = index of the node.
        manager = logic.suggestion_manager(node)
        placed = np.zeros_like(expected)
        for segment_id in manager.suggestion_ids():
            placed |= manager.suggestion_mask(segment_id)
        score = dice(placed, expected)
        self.assertGreaterEqual(score, DICE_MIN, f"suggested segments vs golden: Dice {score:.3f}")
        self.delayDisplay(f"Golden mask check passed (Dice {score:.3f})")
