"""MedSIGHT for 3D Slicer: ask questions about a volume, get answers and suggested segments from a MedSIGHT engine.

This file only wires the Qt-free / Slicer-free pieces of ``MedSIGHTSlicerLib`` to Slicer: the conversation panel
(chat_panel), the HTTP client (client), node <-> upload geometry (geometry) and suggested segments (suggestions).
"""

# ruff: noqa: N802 - Slicer's module API names (setup, onXxx, runTest) and the module file name are fixed

from __future__ import annotations

import logging
import os

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from MedSIGHTSlicerLib import packages
from MedSIGHTSlicerLib import shortcuts as review_shortcuts
from MedSIGHTSlicerLib.chat_panel import ChatPanel
from MedSIGHTSlicerLib.connection_check import ConnectionCheck
from MedSIGHTSlicerLib.engine_launch import launch_plan, startup_environment
from MedSIGHTSlicerLib.engine_process import EngineProcess, leave_engine, output_lines, replaced_by_reload
from MedSIGHTSlicerLib.export import export_labelmap_file, export_report, remember_folder
from MedSIGHTSlicerLib.export_dialog import ask_export_path
from MedSIGHTSlicerLib.naming import TERMINOLOGY_FILE
from MedSIGHTSlicerLib.review_host import ReviewHost
from MedSIGHTSlicerLib.session import MedSIGHTSession
from MedSIGHTSlicerLib.settings import ConnectionSettings
from MedSIGHTSlicerLib.settings_page import ApplicationSettings, ConnectionForm
from MedSIGHTSlicerLib.views import VIEW_NAMES

MODEL_CARD_TIMEOUT_S = 10.0
#: The README's Slicer section (the extension's homepage + its anchor).
HELP_URL = "https://github.com/medsight/MedSIGHTSlicer#install-in-3d-slicer"


def ensure_packages(requirements: list[str], purpose: str) -> bool:
    """Install missing packages into Slicer's Python after the user agrees (packages.ensure decides), with a wait
    cursor while pip runs. A failed install raises ValueError, which the caller shows once."""

    def install(args: list[str]) -> None:
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            packages.pip_install_without_dialogs(slicer.util.pip_install, args)  # Slicer 5.12's own dialogs: none
        finally:
            slicer.app.restoreOverrideCursor()

    def confirm(question: str) -> bool:
        return bool(slicer.util.confirmOkCancelDisplay(question, windowTitle="MedSIGHT"))

    return packages.ensure(requirements, purpose, confirm, install)


class MedSIGHTSlicer(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSIGHT"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSIGHT developers (MedSIGHT for 3D Slicer project)"]
        self.parent.helpText = (
            "Ask questions about the selected volume. Answers stream into the conversation; regions the model "
            "names become suggested segments that you accept or reject. Research use only, not for clinical use. "
            f'See the <a href="{HELP_URL}">user guide</a> for starting the engine and connecting.'
        ) + review_shortcuts.help_html()
        self.parent.acknowledgementText = "Uses the MedSIGHT model (ICML 2026) through a local or remote engine."
        # One settings page per Slicer session, in Application Settings from start-up on (see ApplicationSettings).
        self.application_settings = ApplicationSettings(qt.QSettings)
        self.terminology_context = ""
        self.reloaded_engine = None  # the running engine a developer Reload hands to the new widget
        slicer.app.connect("startupCompleted()", self.add_settings_page)
        slicer.app.connect("startupCompleted()", self.load_terminology)
        # After qSlicerCoreApplication's own aboutToQuit slot (connected first), which calls every widget's cleanup().
        slicer.app.connect("aboutToQuit()", self.leave_reloaded_engine)

    def add_settings_page(self) -> None:
        """Application Settings > MedSIGHT; once (the widget calls it too, for a module loaded after start-up)."""
        if not slicer.app.commandOptions().noMainWindow:
            self.application_settings.add_page(_add_settings_panel)

    def leave_reloaded_engine(self) -> None:
        """At exit: an engine a Reload handed on and no widget took over is stopped, or left running, as at exit."""
        if self.reloaded_engine is not None:
            leave_engine(self.reloaded_engine, self.application_settings.settings.stop_engine_on_exit, False)
            self.reloaded_engine = None

    def load_terminology(self) -> None:
        """Our terminology context, from start-up on and once (the widget calls it too): Slicer 5.8's terminology
        picker shows a segment's terms only from a loaded context, also for segmentations saved in earlier sessions."""
        if not self.terminology_context:
            logic = slicer.modules.terminologies.logic()
            self.terminology_context = logic.LoadTerminologyFromFile(self.resourcePath(TERMINOLOGY_FILE))


def _add_settings_panel(page_widget: qt.QWidget) -> ctk.ctkSettingsPanel:
    panel = ctk.ctkSettingsPanel()
    qt.QVBoxLayout(panel).addWidget(page_widget)
    slicer.app.settingsDialog().addPanel("MedSIGHT", panel)
    return panel


class MedSIGHTSlicerWidget(ScriptedLoadableModuleWidget):
    """The module panel: connection settings, input volume, and the conversation. Wiring only: every decision is
    in MedSIGHTSlicerLib (session, settings, engine_launch, views)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: MedSIGHTSlicerLogic | None = None
        self.panel: ChatPanel | None = None
        self.engine = EngineProcess(on_output=self._engine_output, on_finished=self._engine_finished,
                                    on_partial=self._engine_partial)
        self.settings = ConnectionSettings()
        self.connection_check = ConnectionCheck()

    def setup(self) -> None:
        module = slicer.modules.MedSIGHTSlicerInstance
        # Before anything that can fail: an engine left with the module object (a Reload's) is stopped by no one, and
        # cleanup() at exit leaves it as the user's "stop on exit" says, not as this widget's defaults.
        self.settings = module.application_settings.settings
        self._adopt_engine(module)
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MedSIGHTSlicer.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSIGHTSlicerLogic()
        self.logic.on_reset = self._scene_reset
        self.logic.dicom_database = lambda: getattr(slicer, "dicomDatabase", None)

        module.load_terminology()  # a module loaded after start-up (Extension Wizard) missed startupCompleted()
        module.add_settings_page()
        self.application_settings = module.application_settings
        self.settings = self.application_settings.attach(lambda _: self._settings_changed(), self.engine)
        # The form saves URL and token; "Remember" changes only when the user toggles the box (see ConnectionForm).
        self.connection_form = ConnectionForm(self.settings, qt.QSettings(), self.ui.urlLineEdit,
                                              self.ui.tokenLineEdit, self.ui.rememberTokenCheckBox)
        self.connection_form.on_saved = lambda _: self.application_settings.show_saved()
        for name in VIEW_NAMES:
            self.ui.viewComboBox.addItem(name)

        self.panel = ChatPanel(None)
        self.ui.chatPanelPlaceholder.layout().addWidget(self.panel.widget)
        self.panel.volume_provider = self._volume_source
        self.panel.current_slice_provider = self._current_view
        self.panel.before_upload = self._consent
        self.panel.on_volume_uploaded = self.logic.remember_volume_id
        self.panel.on_volume_unknown = self.logic.forget_volume_id  # engine restarted: drop the id, send again
        self.panel.on_region_clicked = self.logic.jump_to_region_link  # the chip's own answer and volume
        self.panel.on_accept_all = lambda: self.review_host.accept_all()
        self._connect()

        self.ui.urlLineEdit.connect("editingFinished()", self._connection_edited)
        self.ui.tokenLineEdit.connect("editingFinished()", self._connection_edited)
        self._setup_review()
        self.ui.viewComboBox.connect("currentIndexChanged(int)", lambda _: self._view_changed())
        self.ui.testConnectionButton.connect("clicked(bool)", lambda _: self.onTestConnection())
        self.check_timer = qt.QTimer()
        self.check_timer.setInterval(50)
        self.check_timer.connect("timeout()", self._poll_connection_check)
        self.engine_timer = qt.QTimer()
        self.engine_timer.setInterval(500)
        self.engine_timer.connect("timeout()", self.engine.poll)
        self.ui.startEngineButton.connect("clicked(bool)", lambda _: self.onStartEngine())
        self.ui.stopEngineButton.connect("clicked(bool)", lambda _: self.onStopEngine())
        self.ui.exportButton.connect("clicked(bool)", lambda _: self.onExport())
        self._update_engine_buttons()
        if self.engine.running:
            self.engine_timer.start()  # an engine the widget before a Reload started

    # -- annotator review (issue 20): the widgets live in MedSIGHTSlicerLib.review_host ---------------------
    def _setup_review(self) -> None:
        self.review_host = ReviewHost(self.panel, self._node, self.logic, slicer.util.mainWindow(),
                                      answer_volume=self.logic.answer_volume)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._volume_changed)
        self._volume_changed(self._node())
        self.ui.chatPanelPlaceholder.layout().addWidget(self.review_host.list.widget)
        self.ui.connectionCollapsibleButton.layout().addRow(self.review_host.engine_log.widget)

    def enter(self) -> None:
        if getattr(self, "review_host", None) is not None:
            self.review_host.set_shown(True)

    def exit(self) -> None:
        if getattr(self, "review_host", None) is not None:
            self.review_host.set_shown(False)

    def cleanup(self) -> None:
        # The engine first: a setup() cut short by an error (after it adopted a reloaded engine) left attributes
        # that the steps below need, and the engine then ran on after Slicer's exit, whatever "stop on exit" said.
        # A Reload (the button or slicer.util.reloadScriptedModule) hands the engine on; Slicer's exit stops it.
        if getattr(self, "engine_timer", None) is None:  # setup() cut short: its callbacks need what it never made
            self.engine.rebind()
        handed = leave_engine(self.engine, self.settings.stop_engine_on_exit, replaced_by_reload(type(self)))
        if handed is not None:
            slicer.modules.MedSIGHTSlicerInstance.reloaded_engine = handed  # for the reloaded widget's setup()
        if getattr(self, "review_host", None) is not None:
            # A developer Reload only hides this widget's Qt widgets (reloadScriptedModule): the volume selector still
            # follows the scene and would call into the closed list and panel, the old session's, on each scene close.
            self.ui.inputVolumeSelector.disconnect("currentNodeChanged(vtkMRMLNode*)", self._volume_changed)
            self.review_host.close()
        # Nor may the rest raise there: the next Reload calls this cleanup() first, and would go no further.
        for timer in (getattr(self, "check_timer", None), getattr(self, "engine_timer", None)):
            if timer is not None:
                timer.stop()
        self.connection_check.close()
        if self.panel is not None:
            self.panel.close()  # stop generating and polling for a panel that is going away
        if self.logic is not None:
            self.logic.stop_observing()
        if getattr(self, "connection_form", None) is not None:
            self._save_settings()

    def _adopt_engine(self, module) -> None:
        """Take over the engine that the widget before a developer Reload started (its cleanup handed it on)."""
        handed = getattr(module, "reloaded_engine", None)
        if handed is not None:
            module.reloaded_engine = None
            handed.rebind(self._engine_output, self._engine_finished, self._engine_partial)
            self.engine = handed

    # -- connection ------------------------------------------------------------------------------------------
    def _save_settings(self) -> None:
        self.connection_form.save()  # the engine command and "stop on exit" come from the settings page

    def _settings_changed(self) -> None:
        """The settings page changed them (e.g. forgot the token): show that in the panel's fields."""
        self.connection_form.load()
        self._update_engine_buttons()

    def _connection_edited(self) -> None:
        if self.settings.set_connection(self.ui.urlLineEdit.text, self.ui.tokenLineEdit.text):
            self._connect()  # only a real change drops the client and the engine's volume ids
        self._save_settings()

    def _connect(self) -> None:
        self.settings.set_connection(self.ui.urlLineEdit.text, self.ui.tokenLineEdit.text)
        self._save_settings()
        try:
            self.logic.connect(self.settings.url, self.settings.token or None)
        except ValueError as err:
            self.panel.set_client(None)
            self.ui.connectionStatusLabel.text = str(err)
            return
        self.panel.set_client(self.logic.client)

    def onTestConnection(self) -> None:
        if self.logic.client is None:
            self._connect()
        if self.logic.client is None:
            return
        # The request runs on a worker thread; the timer brings the outcome back, so Slicer never freezes.
        if self.connection_check.start(self.logic.client, MODEL_CARD_TIMEOUT_S, self.engine.running):
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
        # Asked before the engine starts: a dialog open while it runs held back its log (the timer was not started).
        question = self.settings.start_question()
        if question and not slicer.util.confirmOkCancelDisplay(question, windowTitle="MedSIGHT"):
            return
        try:
            plan = launch_plan(self.settings.serve_command, startup_environment(slicer.util),
                               self.settings.stop_engine_on_exit)
            self.engine.start(plan)
        except (ValueError, RuntimeError) as err:
            slicer.util.errorDisplay(f"Could not start the engine: {err}")
        self.engine_timer.start()
        self._update_engine_buttons()

    def onStopEngine(self) -> None:
        self.engine.stop()  # returns at once; the timer's poll() reports the exit (and kills a stuck engine)
        self.engine_timer.start()
        self._update_engine_buttons()

    def _update_engine_buttons(self) -> None:
        self.ui.startEngineButton.enabled = not self.engine.running
        self.ui.stopEngineButton.enabled = self.engine.running

    def _engine_output(self, text: str) -> None:
        self.review_host.engine_log.append(text)
        lines = output_lines(text)
        for line in lines:
            logging.info("medsight engine: %s", line)
        if lines:
            self.ui.connectionStatusLabel.text = lines[-1][:200]

    def _engine_partial(self, line: str) -> None:
        """A progress bar (the model's first download) redrawn in place; Slicer's log gets only finished lines."""
        self.review_host.engine_log.set_partial(line)

    def _engine_finished(self, code: int) -> None:
        self.engine_timer.stop()
        self._update_engine_buttons()
        message = self.engine.finished_message(code)  # None after the user's Stop, whatever the exit code
        if message:
            self.ui.connectionStatusLabel.text = message

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
        if getattr(self, "review_host", None) is not None:
            self.review_host.volume_changed(node)
        if self.panel is not None and node is not None and node.GetScene() is not None:
            self.panel.set_slice_counts(self.logic.slice_counts(node))  # the range boxes fit this volume
            self._view_changed()

    def _scene_reset(self) -> None:
        if self.panel is not None:
            self.panel.cancel()
            self.panel.set_client(self.logic.client)  # the engine's volume ids belong to the closed scene
            self.panel.clear()
        self._volume_changed(self._node())  # the list showed suggestions of the closed scene

    def _volume_source(self):
        node = self._node()
        if node is None:
            return None
        source = self.logic.volume_source(node)  # a ValueError (no image data) goes to the panel's error line
        self.logic.bind(node)  # the question about to be sent is about this volume
        return source

    def _view_changed(self) -> None:
        node = self._node()
        plane = None if node is None else self.logic.view_plane(node, self.ui.viewComboBox.currentText)
        if plane is not None:
            self.panel.plane = plane  # the slice-range boxes take that plane's slice count before Send

    def _current_view(self):
        node = self._node()
        if node is None:
            return None
        view = self.logic.current_view(node, self.ui.viewComboBox.currentText)
        self._view_changed()  # slice ranges and the whole volume go along the chosen view
        return view

    def onExport(self) -> None:
        node = self._node()
        if node is None:
            self.panel.show_error("Choose the input volume whose accepted segments should be exported.")
            return
        # Proposed in the last export's folder, else Slicer's default for saved data; the file name picks the writer.
        path = ask_export_path(qt.QSettings(), slicer.app.defaultScenePath, node.GetName(),
                               self.ui.exportFormatComboBox.currentIndex, slicer.util.mainWindow())
        if not path:
            return
        try:
            report = self.logic.export(node, path, self.review_host.review(node).target)
        except Exception as err:  # shown plainly, never a traceback in the user's face
            self.panel.show_error(f"Export failed: {err}")
            return
        remember_folder(qt.QSettings(), path)
        self.ui.connectionStatusLabel.text = report


class MedSIGHTSlicerLogic(MedSIGHTSession, ScriptedLoadableModuleLogic):
    """The module's logic: ``MedSIGHTSession`` (tested with real MRML nodes) on Slicer's scene, plus export.

    MedSIGHTSession comes first: Slicer's ScriptedLoadableModuleLogic.__init__ calls ``super().__init__()`` with no
    arguments, which must reach ``object``, not MedSIGHTSession (it needs the scene)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        MedSIGHTSession.__init__(self, slicer.mrmlScene)

    def export(self, node, path: str, chosen=None) -> str:
        """Write the user's (accepted) segmentation of ``node`` (``chosen``: the one picked under "Accept into"):
        .seg.nrrd, .nii/.nii.gz plus a JSON of labels, or a DICOM SEG (.dcm) referencing the series ``node`` was
        loaded from. Returns what to tell the user (``export_report``)."""
        user = self.user_segmentation(node, chosen)
        if user is None:
            raise ValueError("nothing accepted yet: accept suggestions (or draw segments) first")
        if path.lower().endswith(".dcm") and not ensure_packages(packages.dicom_seg_requirements(),
                                                                 "DICOM SEG export"):
            raise ValueError("DICOM SEG export needs the highdicom package")
        written = export_labelmap_file(user, node, path, getattr(slicer, "dicomDatabase", None), slicer.util.longPath)
        return export_report(user, node, written)


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
