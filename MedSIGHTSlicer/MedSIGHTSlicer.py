"""MedSIGHT for 3D Slicer: ask questions about a volume, get answers and suggested segments from a MedSIGHT engine.

This file only wires the Qt-free / Slicer-free pieces of ``MedSIGHTSlicerLib`` to Slicer: the conversation panel
(chat_panel), the HTTP client (client), node <-> upload geometry (geometry) and suggested segments (suggestions).
"""

# ruff: noqa: N802 - Slicer's module API names (setup, onXxx, runTest) and the module file name are fixed

from __future__ import annotations

import logging
import os

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from MedSIGHTSlicerLib import geometry
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData, guess_modality
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.connection_check import ConnectionCheck
from MedSIGHTSlicerLib.engine_process import EngineProcess
from MedSIGHTSlicerLib.settings import ConnectionSettings

MODEL_CARD_TIMEOUT_S = 10.0
#: Export combo box entries: (file dialog pattern, default suffix); the suffix picks the writer.
EXPORT_FORMATS = (
    ("Segmentation (*.seg.nrrd)", ".seg.nrrd"),
    ("NIfTI (*.nii.gz)", ".nii.gz"),
    ("DICOM SEG (*.dcm)", ".dcm"),
)


def ensure_packages(names: list[str], purpose: str) -> bool:
    """Import ``names``, installing the missing ones into Slicer's Python after the user agrees."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if not missing:
        return True
    question = f"{purpose} needs the Python package(s) {', '.join(missing)}. Install them into 3D Slicer now?"
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle="MedSIGHT"):
        return False
    with slicer.util.tryWithErrorDisplay("Installing Python packages failed.", waitCursor=True):
        slicer.util.pip_install(" ".join(missing))
        return True
    return False


class MedSIGHTSlicer(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSIGHT"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSIGHT for 3D Slicer developers"]
        self.parent.helpText = (
            "Ask questions about the selected volume. Answers stream into the conversation; regions the model "
            "names become suggested segments that you accept or reject. Research use only, not for clinical use."
        )
        self.parent.acknowledgementText = "Uses the MedSIGHT model (ICML 2026) through a local or remote engine."


class MedSIGHTSlicerWidget(ScriptedLoadableModuleWidget):
    """The module panel: connection settings, input volume, and the conversation."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: MedSIGHTSlicerLogic | None = None
        self.panel: ChatPanel | None = None
        self.engine = EngineProcess(on_output=self._engine_output, on_finished=self._engine_finished)
        self.settings = ConnectionSettings()
        self.connection_check = ConnectionCheck()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedSIGHTSlicer.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSIGHTSlicerLogic()

        self.settings = ConnectionSettings.load(qt.QSettings())
        self.ui.urlLineEdit.text = self.settings.url
        self.ui.tokenLineEdit.text = self.settings.token
        self.ui.serveCommandLineEdit.text = self.settings.serve_command
        self.ui.stopOnExitCheckBox.checked = self.settings.stop_engine_on_exit

        self.panel = ChatPanel(None)
        self.ui.chatPanelPlaceholder.layout().addWidget(self.panel.widget)
        self.panel.volume_provider = self._volume_source
        self.panel.current_slice_provider = self._current_slice
        self.panel.before_upload = self._consent
        self.panel.on_volume_uploaded = self.logic.remember_volume_id
        self.panel.on_answers = self._apply_answers
        self.panel.on_region_clicked = self._jump_to_region
        self.panel.on_accept_all = self._accept_all
        self._apply_connection()

        self.ui.urlLineEdit.connect("editingFinished()", self._apply_connection)
        self.ui.tokenLineEdit.connect("editingFinished()", self._apply_connection)
        self.ui.serveCommandLineEdit.connect("editingFinished()", self._save_settings)
        self.ui.stopOnExitCheckBox.connect("toggled(bool)", lambda _: self._save_settings())
        self.ui.testConnectionButton.connect("clicked(bool)", lambda _: self.onTestConnection())
        self.check_timer = qt.QTimer()
        self.check_timer.setInterval(50)
        self.check_timer.connect("timeout()", self._poll_connection_check)
        self.ui.startEngineButton.connect("clicked(bool)", lambda _: self.onStartEngine())
        self.ui.stopEngineButton.connect("clicked(bool)", lambda _: self.onStopEngine())
        self.ui.exportButton.connect("clicked(bool)", lambda _: self.onExport())
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._volume_changed)
        self._volume_changed(self.ui.inputVolumeSelector.currentNode())
        self._update_engine_buttons()

    def cleanup(self) -> None:
        self.check_timer.stop()
        self.connection_check.close()
        if self.panel is not None:
            self.panel.close()  # stop generating and polling for a panel that is going away
        self._save_settings()
        if self.engine.running and self.settings.stop_engine_on_exit:
            self.engine.stop()

    # -- connection ------------------------------------------------------------------------------------------
    def _save_settings(self) -> None:
        self.settings.url = self.ui.urlLineEdit.text.strip()
        self.settings.token = self.ui.tokenLineEdit.text
        self.settings.serve_command = self.ui.serveCommandLineEdit.text.strip()
        self.settings.stop_engine_on_exit = bool(self.ui.stopOnExitCheckBox.checked)
        self.settings.save(qt.QSettings())

    def _apply_connection(self) -> None:
        self._save_settings()
        try:
            self.logic.connect(self.settings.url, self.settings.token or None)
        except ValueError as err:
            self.panel.set_client(None)
            self.ui.connectionStatusLabel.text = str(err)
            return
        self.panel.set_client(self.logic.client)

    def onTestConnection(self) -> None:
        self._apply_connection()
        if self.logic.client is None:
            return
        # The request runs on a worker thread; the timer brings the outcome back, so Slicer never freezes.
        if self.connection_check.start(self.logic.client, MODEL_CARD_TIMEOUT_S):
            self.ui.connectionStatusLabel.text = "Checking the engine..."
            self.ui.testConnectionButton.enabled = False
            self.check_timer.start()

    def _poll_connection_check(self) -> None:
        outcome = self.connection_check.poll()
        if outcome is None:
            return
        self.check_timer.stop()
        self.ui.testConnectionButton.enabled = True
        self.ui.connectionStatusLabel.text = outcome.text
        if outcome.ok:
            self.logic.model_name = f"{outcome.card.name} {outcome.card.version}"

    def onStartEngine(self) -> None:
        self._save_settings()
        try:
            self.engine.start(self.settings.serve_command)
        except (ValueError, RuntimeError) as err:
            slicer.util.errorDisplay(f"Could not start the engine: {err}")
        self._update_engine_buttons()

    def onStopEngine(self) -> None:
        self.engine.stop()
        self._update_engine_buttons()

    def _update_engine_buttons(self) -> None:
        self.ui.startEngineButton.enabled = not self.engine.running
        self.ui.stopEngineButton.enabled = self.engine.running

    def _engine_output(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                logging.info("medsight engine: %s", line)
        self.ui.connectionStatusLabel.text = self.engine.output.strip().splitlines()[-1][:200]

    def _engine_finished(self, code: int) -> None:
        self._update_engine_buttons()
        if code not in (0, 15, -15):
            self.ui.connectionStatusLabel.text = f"The engine stopped (exit code {code}). {self.engine.output[-300:]}"

    def _consent(self, url: str) -> bool:
        """Before the first upload to another computer: the images (possibly patient data) leave this one."""
        if not self.settings.needs_consent(url):
            return True
        agreed = slicer.util.confirmYesNoDisplay(
            f"The engine at {url} is not on this computer. Asking a question sends the whole volume there.\n\n"
            "Only continue if you may share these images with that server (remove patient identifiers first "
            "where required).\n\nSend images to this server?",
            windowTitle="MedSIGHT: send images?",
        )
        if agreed:
            self.settings.record_consent(url)
            self._save_settings()
        return bool(agreed)

    # -- volume and answers ----------------------------------------------------------------------------------
    def _node(self):
        return self.ui.inputVolumeSelector.currentNode()

    def _volume_changed(self, node) -> None:
        if node is not None and node.GetImageData() is not None:
            self.panel.set_slice_count(node.GetImageData().GetDimensions()[2])

    def _volume_source(self):
        node = self._node()
        return None if node is None else self.logic.volume_source(node)

    def _current_slice(self) -> int | None:
        node = self._node()
        return None if node is None else self.logic.red_slice_index(node)

    def _apply_answers(self, answers) -> None:
        node = self._node()
        if node is not None:
            self.logic.apply_answers(node, answers, question=self.panel.last_question)

    def _jump_to_region(self, slice_index: int, index: int) -> None:
        node = self._node()
        if node is not None:
            self.logic.jump_to_region(node, slice_index, index)

    def onExport(self) -> None:
        node = self._node()
        if node is None:
            self.panel.show_error("Choose the input volume whose accepted segments should be exported.")
            return
        pattern, suffix = EXPORT_FORMATS[self.ui.exportFormatComboBox.currentIndex]
        path = qt.QFileDialog.getSaveFileName(None, "Export segmentation", node.GetName() + suffix, pattern)
        if not path:
            return
        try:
            written = self.logic.export(node, path)
        except Exception as err:  # shown plainly, never a traceback in the user's face
            self.panel.show_error(f"Export failed: {err}")
            return
        self.ui.connectionStatusLabel.text = f"Exported to {written}"

    def _accept_all(self) -> None:
        node = self._node()
        if node is not None:
            self.logic.accept_all(node)


class MedSIGHTSlicerLogic(ScriptedLoadableModuleLogic):
    """Uploads volume nodes (once each), asks, and turns answers into suggested segments."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client: MedSIGHTClient | None = None
        self.model_name = ""
        self._volume_ids: dict[str, str] = {}
        self._answers: dict[tuple[str, int], object] = {}
        self._managers: dict[str, object] = {}

    def connect(self, url: str, token: str | None = None, timeout: float = 600.0) -> MedSIGHTClient:
        """Talk to the engine at ``url`` from now on (raises ValueError for a malformed URL)."""
        self.client = MedSIGHTClient(url, token=token, timeout=timeout)
        self._volume_ids.clear()  # volume ids belong to one engine
        return self.client

    @staticmethod
    def volume_key(node) -> str:
        """Changes whenever the voxels or the geometry change, so an edited volume is uploaded again."""
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        elements = ",".join(repr(matrix.GetElement(r, c)) for r in range(3) for c in range(4))
        return f"{node.GetID()}|{node.GetImageData().GetMTime()}|{elements}"

    def remember_volume_id(self, key: str, volume_id: str) -> None:
        self._volume_ids[key] = volume_id

    def volume_source(self, node):
        """The engine's id for ``node`` if it has it, else what to upload."""
        key = self.volume_key(node)
        if key in self._volume_ids:
            return self._volume_ids[key]
        array, spacing, origin, direction = geometry.volume_upload_arrays(node)
        modality = node.GetAttribute("MedSIGHT.Modality") or guess_modality(array)
        return VolumeData(array, spacing, origin, direction, modality, key=key)

    def upload(self, node) -> str:
        """Upload ``node`` now (blocking; for scripts and tests) and return its volume id."""
        source = self.volume_source(node)
        if isinstance(source, str):
            return source
        info = self.client.upload_volume(
            source.array, source.spacing, source.origin, source.direction, modality=source.modality
        )
        self.remember_volume_id(source.key, info.volume_id)
        return info.volume_id

    def ask(self, node, question: str, indices, options=None, plane: str = "axial"):
        """Upload if needed, ask (blocking), and add the regions as suggestions. Returns the ``AskResult``."""
        result = self.client.ask(self.upload(node), question, plane=plane, indices=list(indices), options=options)
        self.apply_answers(node, [a for a in result.answers if a.regions], question=question, model=result.model)
        return result

    def suggestion_manager(self, node):
        from MedSIGHTSlicerLib.suggestions import SuggestionManager

        manager = self._managers.get(node.GetID())
        if manager is None:
            manager = SuggestionManager(slicer.mrmlScene, node, model=self.model_name)
            self._managers[node.GetID()] = manager
        return manager

    def apply_answers(self, node, answers, question: str = "", model: str | None = None) -> list[str]:
        """One question's answers: regions of the same finding on several slices become one 3D suggestion."""
        for answer in answers:
            self._answers[(node.GetID(), answer.index)] = answer
        if not answers:
            return []
        return self.suggestion_manager(node).add_answers(answers, question=question, model=model)

    def export(self, node, path: str) -> str:
        """Write the user's (accepted) segmentation of ``node``: .seg.nrrd, .nii/.nii.gz plus a JSON of labels, or
        a DICOM SEG (.dcm) referencing the series ``node`` was loaded from."""
        from MedSIGHTSlicerLib.export import export_labelmap_file

        user = self.suggestion_manager(node).find_user_node()
        if user is None:
            raise ValueError("nothing accepted yet: accept suggestions (or draw segments) first")
        if path.lower().endswith(".dcm") and not ensure_packages(["highdicom"], "DICOM SEG export"):
            raise ValueError("DICOM SEG export needs the highdicom package")
        return str(export_labelmap_file(user, node, path, getattr(slicer, "dicomDatabase", None)))

    def accept_all(self, node) -> list[str]:
        return self.suggestion_manager(node).accept()

    def red_slice_index(self, node) -> int:
        """The k index of ``node`` shown in the Red slice view (what "Current slice" means for axial asks)."""
        slice_node = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        ras = [slice_node.GetSliceToRAS().GetElement(r, 3) for r in range(3)] + [1.0]
        ras_to_ijk = np.linalg.inv(geometry.ijk_to_ras(node))
        k = round(float((ras_to_ijk @ np.asarray(ras))[2]))
        return min(max(k, 0), node.GetImageData().GetDimensions()[2] - 1)

    def jump_to_region(self, node, slice_index: int, index: int) -> bool:
        """Centre the slice views on a region of the latest answer about ``slice_index``."""
        answer = self._answers.get((node.GetID(), slice_index))
        region = None if answer is None else next((r for r in answer.regions if r.index == index), None)
        if region is None or region.bbox is None:
            return False
        row0, col0, row1, col1 = region.bbox
        pixel = np.array([(col0 + col1) / 2.0, (row0 + row1) / 2.0, 0.0, 1.0])
        r, a, s = (answer.slice_to_ras @ pixel)[:3]
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, float(r), float(a), float(s))
        return True


class MedSIGHTSlicerTest(ScriptedLoadableModuleTest):
    """Runs Testing/Python/MedSIGHTSlicerSelfTest.py when it is beside the module (source tree), else a smoke test."""

    def runTest(self) -> None:
        path = os.path.join(os.path.dirname(__file__), "Testing", "Python", "MedSIGHTSlicerSelfTest.py")
        if os.path.isfile(path):
            import importlib.util

            spec = importlib.util.spec_from_file_location("MedSIGHTSlicerSelfTest", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.MedSIGHTSlicerSelfTestTest().runTest()
            return
        slicer.mrmlScene.Clear(0)
        logic = MedSIGHTSlicerLogic()
        logic.connect("http://127.0.0.1:8765")
        self.assertIsNotNone(logic.client)
        self.delayDisplay("MedSIGHT smoke test passed (the full self-test is in the source tree)")
