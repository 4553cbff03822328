"""The module's review wiring (ReviewHost) with the embedded demo model: a range ask about the abdominal CT phantom
streams suggestions into the list, Accept all goes through the list, the module keys follow enter()/exit();
screenshots of the conversation with its suggestion list in light and dark palettes (test-outputs/)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer

import medsight
import medsight.server.app
from medsight.demo.sources import make_ct_phantom
from medsight_testing.chat import wait_until_answered
from medsight_testing.live_server import live_server
from medsight_testing.mrml import make_volume
from medsight_testing.palettes import dark_palette
from medsight_testing.review_scene import check_segments, slab_answer, user_segmentation
from MedSIGHTSlicerLib import theme
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.geometry import segment_array, volume_upload_arrays
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.review_host import ReviewHost
from MedSIGHTSlicerLib.session import MedSIGHTSession

OUTPUTS = Path(os.environ.get("MEDSIGHT_TEST_OUTPUTS", Path(__file__).resolve().parents[2] / "test-outputs"))
QUESTION = "Please segment the liver and the spleen."


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    application.setStyle("Fusion")
    yield application
    application.processEvents()


@pytest.fixture(scope="module")
def demo_url():
    engine = medsight.Engine.load("demo", device="cpu")
    with live_server(medsight.server.app.create_app(engine)) as base_url:
        yield base_url


def test_range_ask_streams_into_the_list_and_accept_all(app, demo_url):
    phantom = make_ct_phantom(np.random.default_rng(7))
    scene = slicer.vtkMRMLScene()
    volume = make_volume(scene, phantom.volume.array.astype(np.int16), phantom.volume.ijk_to_ras, name="Abdomen CT")
    user = user_segmentation(scene, volume, "Abdomen CT segmentation")
    array, spacing, origin, direction = volume_upload_arrays(volume)
    liver_slices = np.nonzero(phantom.masks["liver"].any(axis=(1, 2)))[0]
    first = int(liver_slices.mean()) - 2

    window = qt.QMainWindow()
    central = qt.QWidget()
    layout = qt.QVBoxLayout(central)
    window.setCentralWidget(central)
    panel = ChatPanel(MedSIGHTClient(demo_url, timeout=120, retries=0))
    panel.options = {"max_new_tokens": 40, "seed": 0}
    panel.volume_provider = lambda: VolumeData(array, spacing, origin, direction, "CT", key="abdomen")
    logic = MedSIGHTSession(scene)  # the module's logic (without Slicer's module base class)
    logic.model_name = "medsight-demo"
    manager = logic.suggestion_manager(volume)
    host = ReviewHost(panel, lambda: volume, logic, window)
    layout.addWidget(panel.widget, 3)
    layout.addWidget(host.list.widget, 2)
    layout.addWidget(host.engine_log.widget)
    host.volume_changed(volume)
    window.resize(560, 860)
    window.show()
    try:
        assert not host.module_keys.shortcuts[0].isEnabled()  # Ctrl+Z only while the module is shown
        host.set_shown(True)
        assert all(s.isEnabled() for s in host.module_keys.shortcuts)

        panel.set_slice_count(array.shape[0])
        panel.set_scope("range", first, first + 4)
        assert panel.send(QUESTION)
        rows_seen = []
        wait_until_answered(app, panel, 120, lambda: rows_seen.append(host.list.table.topLevelItemCount()), 0.01)
        app.processEvents()
        assert panel.error.text() == ""
        names = sorted(host.list.table.topLevelItem(n).text(0) for n in range(host.list.table.topLevelItemCount()))
        assert names == ["Liver", "Spleen"], names
        assert rows_seen[0] == 0 and max(rows_seen) == 2  # rows appeared while the ask ran
        for n in range(2):
            item = host.list.table.topLevelItem(n)
            assert item.text(1) == f"axial {first}–{first + 4}" and item.text(3) == QUESTION
        # The demo model's liver matches the phantom's on the asked slices.
        liver_id = next(sid for sid in manager.suggestion_ids()
                        if manager.suggestion(sid).GetName() == "Liver")
        got = manager.suggestion_mask(liver_id)[first : first + 5]
        truth = phantom.masks["liver"][first : first + 5]
        dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
        assert dice > 0.7, dice

        OUTPUTS.mkdir(parents=True, exist_ok=True)
        host.list.select([liver_id])
        for name, palette in (("light", qt.QPalette(app.style().standardPalette())), ("dark", dark_palette())):
            window.setPalette(palette)  # Slicer's theme changed while another module was shown
            host.set_shown(True)  # the module is entered again
            app.processEvents()
            colours = theme.colours_of(panel.conversation)
            assert colours.dark == (name == "dark")
            conversation = panel.conversation.toHtml()
            assert colours.secondary in conversation and colours.success in conversation
            assert qt.QWidget.grab(window).save(str(OUTPUTS / f"review_panel_{name}.png"), "PNG")

        # Accept all goes through the list (one undoable step); Ctrl+Z on the window undoes it.
        masks = {sid: manager.suggestion_mask(sid) for sid in manager.suggestion_ids()}
        host.accept_all()
        assert host.list.table.topLevelItemCount() == 0
        accepted = {user.GetSegmentation().GetNthSegment(n).GetName(): user.GetSegmentation().GetNthSegmentID(n)
                    for n in range(user.GetSegmentation().GetNumberOfSegments())}
        assert sorted(accepted) == ["Liver", "Spleen"]
        assert np.array_equal(segment_array(user, accepted["Liver"], volume), masks[liver_id])
        window.activateWindow()
        host.list.table.setFocus()
        from qtpy.QtTest import QTest

        QTest.keyClick(host.list.table, qt.Qt.Key_Z, qt.Qt.ControlModifier)
        app.processEvents()
        check_segments(user, volume, {})
        assert host.list.table.topLevelItemCount() == 2
    finally:
        host.close()
        panel.close()
        window.close()
        window.deleteLater()
        app.processEvents()


def test_without_a_main_window_the_module_keys_still_have_a_parent(app):
    """Slicer's generic module test builds the widget with --no-main-window: a QShortcut without a parent widget is a
    warning in release Qt and an assertion failure in debug Qt."""
    panel = ChatPanel(MedSIGHTClient("http://127.0.0.1:9", timeout=1, retries=0))
    host = ReviewHost(panel, lambda: None, MedSIGHTSession(slicer.vtkMRMLScene()), None)
    try:
        assert host.module_keys.shortcuts
        assert all(shortcut.parent() is host.list.widget for shortcut in host.module_keys.shortcuts)
    finally:
        host.close()
        panel.close()


def test_removed_volumes_are_let_go(app):
    """A review holds its volume node and so its voxels: once the volume left the scene (deleted, scene closed), the
    host keeps no review of it, also when the module shows the departed node once more on scene close."""
    scene = slicer.vtkMRMLScene()
    panel = ChatPanel(MedSIGHTClient("http://127.0.0.1:9", timeout=1, retries=0))
    logic = MedSIGHTSession(scene)
    volumes = [make_volume(scene, np.zeros((3, 8, 8), np.int16), np.eye(4), name=f"CT {n}") for n in range(2)]
    host = ReviewHost(panel, lambda: volumes[1], logic, None)
    try:
        for volume in volumes:
            host.volume_changed(volume)
        assert len(host._reviews) == 2
        scene.RemoveNode(volumes[0])
        host.volume_changed(volumes[1])
        assert [r.manager.volume_node for r in host._reviews.values()] == [volumes[1]]
        scene.Clear(0)  # File > Close scene
        host.volume_changed(volumes[1])  # what the module's scene reset does with the selector's last node
        assert host._reviews == {} and host.list.review is None
    finally:
        host.close()
        panel.close()


def test_answers_about_a_volume_left_meanwhile_leave_the_selected_volumes_list(app):
    """A question about volume A streams while the user selects B: each answer flipped the list back to A's
    suggestions, and Accept all (which acts on the selected B) then accepted nothing of what the list showed."""
    scene = slicer.vtkMRMLScene()
    panel = ChatPanel(MedSIGHTClient("http://127.0.0.1:9", timeout=1, retries=0))
    logic = MedSIGHTSession(scene)
    asked, other = (make_volume(scene, np.zeros((3, 8, 8), np.int16), np.eye(4), name=f"CT {n}") for n in range(2))
    selected = [asked]
    host = ReviewHost(panel, lambda: selected[0], logic, None, answer_volume=lambda: asked)
    try:
        host.volume_changed(asked)
        host.take_answers([slab_answer(asked, 0, slice(1, 4), slice(2, 5))])
        assert host.list.review.manager.volume_node is asked  # the asked volume's list grows while it is shown
        selected[0] = other
        host.volume_changed(other)
        host.take_answers([slab_answer(asked, 1, slice(1, 4), slice(2, 5))])
        assert host.list.review.manager.volume_node is other
        other_suggestion = slab_answer(other, 2, slice(2, 6), slice(1, 3), label="spleen")
        logic.take_answers(other, [other_suggestion], 1, "current", "Spleen?")
        host.list.refresh()
        host.accept_all()
        user = logic.user_segmentation(other)
        assert user is not None and user.GetSegmentation().GetNumberOfSegments() == 1
        accepted = segment_array(user, user.GetSegmentation().GetNthSegmentID(0), other)
        assert int(accepted.sum()) == int(other_suggestion.regions[0].mask.sum())
        assert len(logic.suggestion_manager(asked).suggestion_ids()) == 2  # A's wait in A's list, none accepted
    finally:
        host.close()
        panel.close()
