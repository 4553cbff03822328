"""In-Slicer self-test of MedSIGHT: sample data through the module's panel, and a stored golden mask.

Needs a MedSIGHT engine. It uses the one at MEDSIGHT_TEST_URL (default http://127.0.0.1:8765, token from
MEDSIGHT_TEST_TOKEN); when none answers and MEDSIGHT_TEST_SERVE holds a command (e.g.
"/path/to/.venv/bin/medsight serve --model tiny --port 8765"), the test starts that engine and stops it after.

The golden check is recorded for the ``tiny`` preset on the CPU (random but seeded weights, greedy decoding): it
pins the whole Slicer path (node -> upload bytes and geometry -> answer -> suggested segment voxels). With another
model it is skipped, with a message; the rest still runs.

Run it from Slicer's Python console::

    path = "/path/to/MedSIGHTSlicer/Testing/Python/MedSIGHTSlicerSelfTest.py"
    exec(open(path).read()); MedSIGHTSlicerSelfTestTest().runTest()
"""

# ruff: noqa: N802 - unittest/Slicer method names and the file name are fixed

from __future__ import annotations

import os
import time

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from MedSIGHTSlicerLib.chat_panel import parse_region_url
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError
from MedSIGHTSlicerLib.engine_process import EngineProcess

ENGINE_URL = os.environ.get("MEDSIGHT_TEST_URL", "http://127.0.0.1:8765")
ENGINE_TOKEN = os.environ.get("MEDSIGHT_TEST_TOKEN") or None
ENGINE_COMMAND = os.environ.get("MEDSIGHT_TEST_SERVE", "")
STARTUP_TIMEOUT_S = 180.0
ANSWER_TIMEOUT_S = 300.0
DICE_MIN = 0.99

# -- the golden case --------------------------------------------------------------------------------------------
# Three 64 x 64 slices: a bright disc in soft tissue (int16), spacing (0.8, 0.8, 2.5) mm, origin RAS (-10, -20, -5),
# identity IJK-to-RAS directions (what Slicer gives a new volume). Recorded with the `tiny` preset on the CPU via
# `medsight serve --model tiny`, asking GOLDEN_QUESTION about axial slice GOLDEN_SLICE with GOLDEN_OPTIONS.
GOLDEN_MODEL = "tiny"
GOLDEN_QUESTION = "What is this?"
GOLDEN_SLICE = 0
GOLDEN_OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
#: The engine's id of exactly these voxels and this LPS geometry (sha256 of the upload): equal ids prove the
#: module sent the node byte for byte with the right geometry.
GOLDEN_VOLUME_ID = "5fd5dc2689db10c3d29a2dee80d61ae1d23a594ddf43555e70a1fcbb4cd8acd9"
#: region index -> (row, col) pixels of its mask on the 64 x 64 slice grid; the other regions are empty.
GOLDEN_REGIONS = {
    1: [(0, 6), (0, 7), (0, 8), (0, 9), (0, 10)],
    2: [(0, 6), (0, 7), (0, 8), (0, 9), (0, 10), (0, 11)],
    5: [(0, 6), (0, 7), (0, 8), (0, 9), (0, 10), (0, 11)],
}


def golden_voxels() -> np.ndarray:
    k, j, i = np.mgrid[0:3, 0:64, 0:64]
    return (np.where((j - 30) ** 2 + (i - 34) ** 2 < 15**2, 180.0, 40.0) + 10.0 * k).astype(np.int16)


def golden_mask(index: int, shape=(64, 64)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for row, col in GOLDEN_REGIONS.get(index, []):
        mask[row, col] = True
    return mask


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
        self._ensure_engine()

    def tearDown(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            type(self).engine = None

    def runTest(self) -> None:
        self.setUp()
        try:
            self.test_sample_data_conversation()
            self.test_golden_mask()
        finally:
            self.tearDown()

    # -- helpers -------------------------------------------------------------------------------------------------
    def _ensure_engine(self) -> None:
        try:
            self.client.health(timeout=5)
            return
        except MedSIGHTError as err:
            if not ENGINE_COMMAND:
                raise AssertionError(
                    f"no MedSIGHT engine at {ENGINE_URL} ({err.message}); start one with "
                    "`medsight serve --model tiny`, or set MEDSIGHT_TEST_SERVE to the command that starts it"
                ) from None
        engine = EngineProcess()
        engine.start(ENGINE_COMMAND)
        type(self).engine = engine
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            slicer.app.processEvents()  # lets the QProcess collect the engine's output
            try:
                self.client.health(timeout=2)
                return
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
        import SampleData

        self.delayDisplay("Loading sample data (MRHead)")
        node = SampleData.SampleDataLogic().downloadSample("MRHead")
        self.assertIsNotNone(node)

        slicer.util.selectModule("MedSIGHTSlicer")
        widget = slicer.modules.medsightslicer.widgetRepresentation().self()
        widget.ui.urlLineEdit.text = ENGINE_URL
        widget.ui.tokenLineEdit.text = ENGINE_TOKEN or ""
        widget._apply_connection()
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
        if any(panel.region(*chip).mask.any() for chip in chips):
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
        """The stored golden regions, through node -> upload -> ask -> suggested segment voxels."""
        card = self.client.model_card(timeout=10)
        health = self.client.health(timeout=10)
        if card.name != GOLDEN_MODEL or health.device != "cpu":
            self.delayDisplay(
                f"Golden mask check skipped: recorded for model {GOLDEN_MODEL!r} on the CPU, the engine runs "
                f"{card.name!r} on {health.device!r}"
            )
            return
        from MedSIGHTSlicer import MedSIGHTSlicerLogic

        logic = MedSIGHTSlicerLogic()
        logic.connect(ENGINE_URL, ENGINE_TOKEN, timeout=ANSWER_TIMEOUT_S)

        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedSIGHT golden disc")
        slicer.util.updateVolumeFromArray(node, golden_voxels())
        node.SetSpacing(0.8, 0.8, 2.5)
        node.SetOrigin(-10.0, -20.0, -5.0)
        node.SetAttribute("MedSIGHT.Modality", "CT")

        volume_id = logic.upload(node)
        self.assertEqual(volume_id, GOLDEN_VOLUME_ID, "the uploaded voxels or geometry differ from the recording")

        result = logic.ask(node, GOLDEN_QUESTION, [GOLDEN_SLICE], options=GOLDEN_OPTIONS)
        answer = result.answers[0]
        self.assertEqual(answer.index, GOLDEN_SLICE)
        self.assertTrue(answer.regions, "the golden answer has regions")
        indices = {region.index for region in answer.regions}
        self.assertTrue(set(GOLDEN_REGIONS) <= indices, f"regions {sorted(indices)} lack {sorted(GOLDEN_REGIONS)}")
        for region in answer.regions:
            score = dice(region.mask, golden_mask(region.index, region.mask.shape))
            self.assertGreaterEqual(score, DICE_MIN, f"region {region.index} ({region.code}): Dice {score:.3f}")

        # The suggested segments hold the same voxels, on slice k = GOLDEN_SLICE of the node.
        manager = logic.suggestion_manager(node)
        expected = np.zeros(golden_voxels().shape, dtype=bool)
        for index in GOLDEN_REGIONS:
            expected[GOLDEN_SLICE] |= golden_mask(index)
        placed = np.zeros_like(expected)
        for segment_id in manager.suggestion_ids():
            placed |= manager.suggestion_mask(segment_id)
        score = dice(placed, expected)
        self.assertGreaterEqual(score, DICE_MIN, f"suggested segments vs golden: Dice {score:.3f}")
        self.delayDisplay(f"Golden mask check passed (Dice {score:.3f})")

