"""The suggestion list (offscreen PySide6) over slicer-core's MRML and a live tiny-model engine: multi-select accept
and reject, Show/Hide, Jump, Accept into / Merge into, and the keyboard shortcuts; screenshots in light and dark
palettes (saved under test-outputs/)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer
from qtpy.QtTest import QTest

from medsight_testing.mrml import add_slice_views, make_volume, oblique_matrix, put_under_transform, view_origin
from medsight_testing.palettes import contrast, dark_palette
from medsight_testing.review_scene import (
    add_shared_user_segments,
    check_segments,
    ct_scene,
    ct_voxels,
    organ_masks,
    segment_ids,
    slab_answer,
    user_segmentation,
)
from MedSIGHTSlicerLib import shortcuts, theme
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.geometry import ijk_to_ras, segment_array, volume_upload_arrays
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.review import Review
from MedSIGHTSlicerLib.suggestion_list import SuggestionList
from MedSIGHTSlicerLib.suggestions import SuggestionManager
from MedSIGHTSlicerLib.views import parent_to_world

OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
OUTPUTS = Path(os.environ.get("MEDSIGHT_TEST_OUTPUTS", Path(__file__).resolve().parents[2] / "test-outputs"))


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    application.setStyle("Fusion")  # the style that draws whatever palette it is given (as Slicer's themes do)
    yield application
    application.processEvents()


@pytest.fixture
def setup(app, url):
    """A volume with two user segments in one shared layer, suggestions from 3 live asks, and the list on screen."""
    scene, volume, voxels = ct_scene()
    user = user_segmentation(scene, volume)
    liver, kidney = organ_masks(voxels.shape)
    liver_id, kidney_id = add_shared_user_segments(user, volume, {"Liver": liver, "Kidney": kidney})

    client = MedSIGHTClient(url, timeout=60, retries=0)
    info = client.upload_volume(*volume_upload_arrays(volume), modality="CT")
    manager = SuggestionManager(scene, volume, model="tiny")
    for index in (2, 3, 4):
        result = client.ask(info.volume_id, "Where is the liver?", indices=[index], options=OPTIONS)
        for answer in result.answers:
            manager.add_answer(answer, question="Where is the liver?", model=result.model)
    assert len(manager.suggestion_ids()) >= 6, "the tiny engine's answers on this grid give several regions"

    host = qt.QWidget()
    host.setWindowTitle("MedSIGHT review")
    layout = qt.QVBoxLayout(host)
    panel = SuggestionList()
    layout.addWidget(panel.widget)
    panel.set_review(Review(manager))
    # The module's undo/redo keys, as the Slicer module installs them on its window while it is shown.
    module_keys = shortcuts.ShortcutSet(host, shortcuts.MODULE_SHORTCUTS, panel.actions(), qt.Qt.WindowShortcut)
    host.resize(640, 420)
    host.show()
    host.activateWindow()
    QTest.qWaitForWindowExposed(host)
    app.processEvents()
    state = {
        "scene": scene, "volume": volume, "user": user, "manager": manager, "panel": panel, "host": host,
        "expected": {liver_id: liver, kidney_id: kidney}, "liver": liver_id, "kidney": kidney_id, "keys": module_keys,
    }
    yield state
    module_keys.close()
    panel.close()
    host.close()
    host.deleteLater()
    app.processEvents()


def press(app, widget, key, modifier=None) -> None:
    widget.setFocus()
    app.processEvents()
    if modifier is None:
        QTest.keyClick(widget, key)
    else:
        QTest.keyClick(widget, key, modifier)
    app.processEvents()


def test_rows_multi_select_accept_reject_undo_redo(app, setup):
    panel, manager, user, volume = setup["panel"], setup["manager"], setup["user"], setup["volume"]
    expected = dict(setup["expected"])
    ids = manager.suggestion_ids()
    assert panel.row_ids() == ids
    item = panel.table.topLevelItem(0)
    assert item.text(0) == manager.suggestion(ids[0]).GetName()
    assert item.text(1).startswith("axial ") and item.text(3) == "Where is the liver?"
    assert item.text(2).endswith("%")

    # Two rows at once: click the first, Ctrl+click the third.
    for n, modifier in ((0, qt.Qt.NoModifier), (2, qt.Qt.ControlModifier)):
        rect = panel.table.visualItemRect(panel.table.topLevelItem(n))
        QTest.mouseClick(panel.table.viewport(), qt.Qt.LeftButton, modifier, rect.center())
    assert panel.selected_ids() == [ids[0], ids[2]]
    masks = {sid: manager.suggestion_mask(sid) for sid in ids}
    QTest.mouseClick(panel.accept_button, qt.Qt.LeftButton)
    accepted = [sid for sid in segment_ids(user) if sid not in expected]
    assert len(accepted) == 2
    for new_id, source in zip(accepted, (ids[0], ids[2])):
        expected[new_id] = masks[source]
    check_segments(user, volume, expected)
    assert panel.row_ids() == [sid for sid in ids if sid not in (ids[0], ids[2])]
    assert "Accepted 2 suggestions as new segments" in panel.message.text()

    # Ctrl+Z anywhere in the module's window undoes; Ctrl+Y redoes.
    press(app, panel.table, qt.Qt.Key_Z, qt.Qt.ControlModifier)
    check_segments(user, volume, setup["expected"])
    assert panel.row_ids() == ids
    press(app, panel.table, qt.Qt.Key_Y, qt.Qt.ControlModifier)
    check_segments(user, volume, expected)

    # Keys in the list: N selects the next row, R rejects it (and selects the row that took its place).
    rows = panel.row_ids()
    panel.select([rows[0]])
    press(app, panel.table, qt.Qt.Key_N)
    assert panel.selected_ids() == [rows[1]]
    press(app, panel.table, qt.Qt.Key_P)
    assert panel.selected_ids() == [rows[0]]
    press(app, panel.table, qt.Qt.Key_R)
    assert panel.row_ids() == rows[1:]
    assert panel.selected_ids() == [rows[1]]
    check_segments(user, volume, expected)  # a reject never touches the user's node

    # H hides the selection in the preview, again shows it; J centres the views on it.
    display = manager.preview_node.GetDisplayNode()
    press(app, panel.table, qt.Qt.Key_H)
    assert not display.GetSegmentVisibility(rows[1])
    press(app, panel.table, qt.Qt.Key_H)
    assert display.GetSegmentVisibility(rows[1])
    # The volume moved under a transform: the views centre on where the suggestion is shown, in world coordinates.
    views = add_slice_views(volume.GetScene())
    put_under_transform(volume.GetScene(), volume)
    press(app, panel.table, qt.Qt.Key_J)
    k, j, i = np.argwhere(manager.suggestion_mask(rows[1])).mean(axis=0)
    expected = (parent_to_world(volume) @ ijk_to_ras(volume) @ [i, j, k, 1.0])[:3]
    for view in views.values():
        np.testing.assert_allclose(view_origin(view), expected, atol=1e-6)

    # A accepts the selection; typing in another widget is not taken over by the list's letter keys. While the volume
    # sits turned against the lattice the user's segmentation is saved on, the accept is refused, saying why.
    edit = qt.QLineEdit(setup["host"])
    edit.show()
    press(app, edit, qt.Qt.Key_A)
    assert edit.text() == "a" and panel.row_ids() == rows[1:]
    press(app, panel.table, qt.Qt.Key_A)
    assert panel.row_ids() == rows[1:] and "turned against the voxels of" in panel.message.text()
    volume.SetAndObserveTransformNodeID(None)
    press(app, panel.table, qt.Qt.Key_A)
    assert panel.row_ids() == rows[2:]


def test_merge_into_a_chosen_segment_and_show_3d(app, setup):
    panel, manager, user, volume = setup["panel"], setup["manager"], setup["user"], setup["volume"]
    expected = dict(setup["expected"])
    liver_id = setup["liver"]
    assert [panel.target_combo.itemText(n) for n in range(panel.target_combo.count())] == ["CT segmentation"]
    modes = [panel.mode_combo.itemText(n) for n in range(panel.mode_combo.count())]
    assert modes == ["New segments", "Merge into 'Liver'", "Merge into 'Kidney'"]
    panel.mode_combo.setCurrentIndex(1)
    first = manager.suggestion_ids()[0]
    grown = manager.suggestion_mask(first)
    panel.select([first])
    QTest.mouseClick(panel.accept_button, qt.Qt.LeftButton)
    expected[liver_id] = expected[liver_id] | grown
    check_segments(user, volume, expected)  # only the named segment changed; the kidney is as it was
    assert "merged into 'Liver'" in panel.message.text()
    QTest.mouseClick(panel.undo_button, qt.Qt.LeftButton)
    check_segments(user, volume, setup["expected"])

    # Show 3D builds closed surfaces of the preview and the target and shows them in 3D.
    panel.show_3d.setChecked(True)
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    for node in (manager.preview_node, user):
        assert node.GetSegmentation().ContainsRepresentation(surface)
        assert node.GetDisplayNode().GetVisibility3D()
    polydata = manager.preview_node.GetSegmentation().GetSegment(first).GetRepresentation(surface)
    assert polydata.GetNumberOfPoints() > 0
    panel.show_3d.setChecked(False)
    assert not manager.preview_node.GetSegmentation().ContainsRepresentation(surface)

    # An undo the history refuses (the merged segment was edited since) is shown, not raised.
    panel.mode_combo.setCurrentIndex(1)
    panel.select([first])
    panel.accept()
    edited = segment_array(user, liver_id, volume)
    edited[0, 0, 0] = True
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _labelmap(edited, volume), user, liver_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    assert not panel.undo()
    assert "edited since" in panel.message.text()
    assert panel.message.styleSheet() == f"color: {theme.colours_of(panel.widget).error};"


def _labelmap(mask, volume):
    from MedSIGHTSlicerLib.geometry import labelmap_from_array

    return labelmap_from_array(mask, volume)


def test_light_and_dark_palettes_are_legible_and_screenshotted(app, setup):
    panel, host = setup["panel"], setup["host"]
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    panel.select(panel.row_ids()[:2])
    shots = {}
    for name, palette in (("light", qt.QPalette(app.style().standardPalette())), ("dark", dark_palette())):
        host.setPalette(palette)
        panel.widget.setPalette(palette)
        panel.apply_palette()
        panel._show_message("cannot undo: the merged segment 'Liver' was edited since", error=True)
        app.processEvents()
        colours = theme.colours_of(panel.widget)
        assert colours.dark == (name == "dark")
        for colour, minimum in ((colours.text, 7.0), (colours.error, 4.5), (colours.secondary, 3.0)):
            assert contrast(colour, colours.base) >= minimum, (name, colour, colours.base)
        path = OUTPUTS / f"suggestion_list_{name}.png"
        assert panel.save_screenshot(str(path))
        image = qt.QImage(str(path))
        assert image.width() > 300 and image.height() > 200
        # The rendered background follows the palette (sampled at the panel's bottom-right corner).
        pixel = qt.QColor(image.pixel(image.width() - 2, image.height() - 2))
        shots[name] = (pixel.red() + pixel.green() + pixel.blue()) / 3
    assert shots["light"] > 160 and shots["dark"] < 90


def test_a_segment_name_shows_as_typed_in_the_message_line(app, setup):
    """Names are the user's text (renamed in the Segment Editor): the message line shows them as typed, neither as
    HTML entities nor as markup."""
    panel, manager = setup["panel"], setup["manager"]
    first = manager.suggestion_ids()[0]
    name = "Patient's liver & <b>spleen</b>"
    manager.suggestion(first).SetName(name)
    panel.refresh()
    panel.on_edit = lambda selection: None
    panel.select([first])
    panel.edit()
    assert f"Correct '{name}'" in panel.message.text()
    assert panel.message.textFormat() == qt.Qt.PlainText


def test_the_message_line_follows_a_theme_change_while_shown(app, setup):
    """Slicer's theme can change while the module is shown: the next message takes the new palette's colours."""
    panel, host = setup["panel"], setup["host"]
    host.setPalette(dark_palette())
    app.processEvents()
    panel.select(setup["manager"].suggestion_ids()[:1])
    panel.accept()
    colours = theme.colours_of(panel.widget)
    assert colours.dark
    assert colours.secondary in panel.message.styleSheet()
    assert contrast(colours.secondary, colours.base) >= 4.5


def _add_lesion(manager, shape: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """One lesion suggested on axial slice 2 of the oblique CT: its segment ids and its (j, i) mask."""
    from MedSIGHTSlicerLib.protocol import Region, SliceAnswer

    lesion = np.zeros(shape[1:], dtype=bool)
    lesion[20:24, 4:8] = True
    slice_to_ras = oblique_matrix() @ np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]])
    answer = SliceAnswer("axial", 2, "A lesion.", [Region("[M1_1]", "lesion", 0, lesion, 0.8, None)], slice_to_ras)
    return manager.add_answer(answer), lesion


def test_a_merge_choice_whose_segment_got_replaced_under_its_id_shows_new_segments(app):
    """The box showed "Merge into 'Tumour'" for a new segment given deleted Liver's id, which is not the one chosen."""
    scene, volume, voxels = ct_scene()
    liver, kidney = organ_masks(voxels.shape)
    own = user_segmentation(scene, volume)
    (liver_id,) = add_shared_user_segments(own, volume, {"Liver": liver})
    manager = SuggestionManager(scene, volume)
    _add_lesion(manager, voxels.shape)
    panel = SuggestionList()
    try:
        panel.set_review(Review(manager))
        panel.mode_combo.setCurrentIndex(1)
        assert panel.review.merge_into == liver_id
        own.GetSegmentation().RemoveSegment(liver_id)
        assert add_shared_user_segments(own, volume, {"Tumour": kidney}) == [liver_id]
        panel.refresh()  # e.g. the next answer arrives
        assert panel.mode_combo.currentText() == "New segments" and panel.review.merge_into == ""
    finally:
        panel.close()


@pytest.mark.parametrize("action", ["accept", "reject", "jump", "edit", "toggle"])
def test_a_selected_suggestion_deleted_since_is_named_and_nothing_is_done(app, action):
    """A selected row's suggestion was deleted in the Segment Editor before the key press: the message named it by
    its id ("no suggestion 'MedSIGHT_2'"), which the list never shows. Show/Hide hid the rows still there without a
    word (and asked Slicer for the gone one's display: a warning in its log)."""
    scene, volume, _ = ct_scene()
    manager = SuggestionManager(scene, volume)
    [liver] = manager.add_answer(slab_answer(volume, 2, rows=slice(20, 24), cols=slice(4, 8)))
    [kidney] = manager.add_answer(slab_answer(volume, 3, rows=slice(8, 12), cols=slice(20, 26), label="kidney"))
    panel = SuggestionList()
    edited = []
    panel.on_edit = edited.append
    try:
        panel.set_review(Review(manager))
        panel.select([liver, kidney] if action in ("accept", "reject", "toggle") else [kidney])
        manager.preview_node.GetSegmentation().RemoveSegment(kidney)
        assert not getattr(panel, action)()
        assert panel.message.text() == ("'Kidney' is no longer among the suggestions (deleted from the suggestions' "
                                        "segmentation since): nothing was done. The list is updated; select again.")
        assert manager.suggestion_ids() == panel.row_ids() == [liver] and not manager.can_undo and edited == []
        assert segment_ids(manager.find_user_node()) == []
        assert [row.visible for row in panel.review.rows()] == [True]
    finally:
        panel.close()


def test_after_the_chosen_segmentation_goes_the_list_offers_and_merges_into_what_it_shows(app):
    """Accept into "Second opinion", which is then removed (Data module): the boxes show the user's own with its
    segments, and a merge chosen there lands in the segment shown, nowhere else."""
    scene, volume, voxels = ct_scene()
    liver, kidney = organ_masks(voxels.shape)
    own = user_segmentation(scene, volume)
    (liver_id,) = add_shared_user_segments(own, volume, {"Liver": liver})
    other = user_segmentation(scene, volume, name="Second opinion")
    add_shared_user_segments(other, volume, {"Kidney": kidney})
    manager = SuggestionManager(scene, volume)
    ids, lesion = _add_lesion(manager, voxels.shape)
    panel = SuggestionList()
    try:
        panel.set_review(Review(manager))
        panel.target_combo.setCurrentIndex(1)
        assert [panel.mode_combo.itemText(n) for n in range(panel.mode_combo.count())] == [
            "New segments", "Merge into 'Kidney'"]
        scene.RemoveNode(other)
        panel.refresh()
        assert [panel.target_combo.itemText(n) for n in range(panel.target_combo.count())] == ["CT segmentation"]
        assert [panel.mode_combo.itemText(n) for n in range(panel.mode_combo.count())] == [
            "New segments", "Merge into 'Liver'"]
        panel.mode_combo.setCurrentIndex(1)
        panel.select(ids)
        assert panel.accept() == [liver_id]
        grown = liver.copy()
        grown[2] |= lesion
        check_segments(own, volume, {liver_id: grown})
    finally:
        panel.close()


def test_accept_does_what_the_boxes_show_after_the_chosen_segmentation_goes(app):
    """"Second opinion" chosen with a merge into its "Kidney", then removed (Data module). Refreshed, the boxes showed
    the user's own with "Merge into 'Liver'" (the id Kidney had there), a merge nobody chose; now they show new
    segments of the own, and Accept does that. While the boxes still show the removed one, Accept is refused."""
    scene, volume, voxels = ct_scene()
    liver, kidney = organ_masks(voxels.shape)
    own = user_segmentation(scene, volume)
    (liver_id,) = add_shared_user_segments(own, volume, {"Liver": liver})
    manager = SuggestionManager(scene, volume)
    ids, lesion = _add_lesion(manager, voxels.shape)
    expected = np.zeros(voxels.shape, dtype=bool)
    expected[2] = lesion
    panel = SuggestionList()
    try:
        panel.set_review(Review(manager))
        for refreshed in (True, False):
            other = user_segmentation(scene, volume, name="Second opinion")
            (kidney_id,) = add_shared_user_segments(other, volume, {"Kidney": kidney})
            assert kidney_id == liver_id  # segment ids repeat across segmentations
            panel.refresh()
            panel.target_combo.setCurrentIndex(1)
            panel.mode_combo.setCurrentIndex(1)
            scene.RemoveNode(other)
            if refreshed:  # e.g. a streamed answer came in
                panel.refresh()
                shown = (panel.target_combo.currentText(), panel.mode_combo.currentText())
                assert shown == ("CT segmentation", "New segments")
                panel.select(ids)
                [new_id] = panel.accept()
                check_segments(own, volume, {liver_id: liver, new_id: expected})
                panel.undo()
            else:
                panel.select(ids)
                assert panel.accept() == []
                assert "the segmentation to merge into ('Second opinion') was removed" in panel.message.text()
                check_segments(own, volume, {liver_id: liver})
                assert manager.suggestion_ids() == ids
    finally:
        panel.close()


def test_a_selection_does_not_carry_over_to_another_volumes_suggestions(app):
    """Select a row of volume A, then the list shows volume B (the selector changed, or B's streamed answer came in):
    no row of B is selected, so an Accept takes nothing of B's that the user did not pick."""
    from MedSIGHTSlicerLib.protocol import Region, SliceAnswer

    scene = slicer.vtkMRMLScene()
    voxels = ct_voxels()
    slice_to_ras = oblique_matrix() @ np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]])
    reviews = []
    for name in ("CT", "CT follow-up"):
        volume = make_volume(scene, voxels, oblique_matrix(), name=name)
        manager = SuggestionManager(scene, volume)
        regions = []
        for n, label in enumerate(("liver", "lesion")):
            mask = np.zeros(voxels.shape[1:], dtype=bool)
            mask[4 + 10 * n : 8 + 10 * n, 4:8] = True
            regions.append(Region(f"[M1_{n}]", label, n, mask, 0.8, None))
        manager.add_answer(SliceAnswer("axial", 2, "Two.", regions, slice_to_ras))
        reviews.append(Review(manager))
    first, second = reviews
    assert first.manager.suggestion_ids() == second.manager.suggestion_ids()  # the ids repeat
    panel = SuggestionList()
    try:
        panel.set_review(first)
        panel.select(first.manager.suggestion_ids()[1:])
        panel.set_review(second)
        assert panel.selected_ids() == []
        assert panel.accept() == []
        assert len(second.manager.suggestion_ids()) == 2
        assert second.manager.find_user_node().GetSegmentation().GetNumberOfSegments() == 0
        panel.refresh()  # the same review: its selection stays
        panel.select(second.manager.suggestion_ids()[:1])
        panel.set_review(second)
        assert panel.selected_ids() == second.manager.suggestion_ids()[:1]
    finally:
        panel.close()


@pytest.mark.parametrize("id_reused", [False, True])
def test_after_the_merge_segment_is_deleted_accept_adds_new_segments_as_shown(app, id_reused):
    """Merge into 'Liver' is chosen, then the user deletes Liver (Segment Editor): the refused Accept leaves the list
    showing "New segments", and the next Accept does what it shows instead of failing on the gone segment again. So
    too when a new segment got Liver's id (it took the merge)."""
    scene, volume, voxels = ct_scene()
    liver, kidney = organ_masks(voxels.shape)
    own = user_segmentation(scene, volume)
    liver_id, kidney_id = add_shared_user_segments(own, volume, {"Liver": liver, "Kidney": kidney})
    manager = SuggestionManager(scene, volume)
    ids, lesion = _add_lesion(manager, voxels.shape)
    panel = SuggestionList()
    try:
        panel.set_review(Review(manager))
        panel.mode_combo.setCurrentIndex(1)
        assert panel.review.merge_into == liver_id
        own.GetSegmentation().RemoveSegment(liver_id)
        expected = {kidney_id: kidney}
        if id_reused:
            tumour = np.zeros(voxels.shape, dtype=bool)
            tumour[5, 2:6, 2:6] = True
            assert add_shared_user_segments(own, volume, {"Tumour": tumour}) == [liver_id]
            expected[liver_id] = tumour
        panel.select(ids)
        assert panel.accept() == []  # refused: the segment it names is gone
        assert "to merge into ('Liver')" in panel.message.text()
        assert panel.mode_combo.currentText() == "New segments"
        panel.select(ids)
        (new_id,) = panel.accept()
        added = np.zeros(voxels.shape, dtype=bool)
        added[2] = lesion
        check_segments(own, volume, {**expected, new_id: added})
    finally:
        panel.close()
