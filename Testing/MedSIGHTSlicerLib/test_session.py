"""MedSIGHTSession with real MRML nodes (slicer-core): scene close, node removal, a question bound to its volume,
segments under the volume's transform, centring on a region, no empty nodes, tags that survive a reload
(issue 18, defects 6, 7, 9, 10 and the smaller points)."""

from __future__ import annotations

import gc
import re
import sys
import weakref

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from medsight_testing.mrml import (  # noqa: E402
    add_slice_views,
    make_volume,
    oblique_matrix,
    pixel_to_ijk,
    put_under_transform,
    view_origin,
)
from medsight_testing.review_scene import ct_scene, resample_in_place, slab_answer  # noqa: E402
from MedSIGHTSlicerLib.chat_panel import ChatPanel, RegionLink  # noqa: E402
from MedSIGHTSlicerLib.export import export_seg_nrrd, read_seg_nrrd  # noqa: E402
from MedSIGHTSlicerLib.geometry import GeometryError, ijk_to_ras, nodes_by_class, segment_array, vtk_matrix  # noqa: E402
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer  # noqa: E402
from MedSIGHTSlicerLib.qt_shim import qt  # noqa: E402
from MedSIGHTSlicerLib.review import Review  # noqa: E402
from MedSIGHTSlicerLib.review_host import ReviewHost  # noqa: E402
from MedSIGHTSlicerLib.session import MedSIGHTSession  # noqa: E402
from MedSIGHTSlicerLib.suggestions import TAG_LABEL, TAG_MODEL, TAG_QUESTION, get_tag  # noqa: E402
from MedSIGHTSlicerLib.views import parent_to_world  # noqa: E402

SHORT = {"max_new_tokens": 8, "no_code_fallback": True, "seed": 0}


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    application.processEvents()


class ModuleWiring:
    """The chat panel and review host wired to the session as the module file wires them: the selected volume is
    ``selected()``, streamed answers go to ``session.answer_volume()`` through ``ReviewHost.take_answers``; a scene
    reset shows the selected volume's suggestions again."""

    def __init__(self, session: MedSIGHTSession, selected) -> None:
        self.panel = ChatPanel()
        self.host = ReviewHost(self.panel, selected, session, None, answer_volume=session.answer_volume)
        self.panel.on_region_clicked = session.jump_to_region_link
        reset = session.on_reset

        def on_reset() -> None:
            if reset is not None:
                reset()
            self.host.volume_changed(selected())

        session.on_reset = on_reset

    def stream(self, answers, question: str = "", scope: str = "current") -> int:
        """One question's answers as the panel hands them over (``on_region_answers``, then ``on_answers``)."""
        self.panel.ask_serial += 1
        self.panel.last_question, self.panel.last_scope = question, scope
        self.panel.on_region_answers(list(answers))
        self.panel.on_answers(list(answers))
        return self.panel.ask_serial

    def close(self) -> None:
        self.host.close()


def preview_nodes(scene) -> list:
    found = nodes_by_class(scene, "vtkMRMLSegmentationNode")
    return [n for n in found if n.GetAttribute("MedSIGHT.Preview") == "1"]


def test_scene_close_then_same_node_id_gets_a_fresh_start(url, app):
    """Ask, close the scene, load another volume that gets the same node ID, ask again: the answer lands on the new
    volume and nothing of the first survives."""
    scene = slicer.vtkMRMLScene()
    resets = []
    session = MedSIGHTSession(scene, on_reset=lambda: resets.append(1))
    session.connect(url)
    add_slice_views(scene)
    wiring = ModuleWiring(session, lambda: None)
    first_array = (np.arange(4 * 24 * 20).reshape(4, 24, 20) % 97).astype(np.int16)
    first = make_volume(scene, first_array, np.diag([0.9, 0.9, 3.0, 1.0]), name="first")
    first_id = first.GetID()
    session.bind(first)
    first_result = session.ask(first, "Where is the liver?", [1], options=SHORT)
    first_volume_id = session.upload(first)
    (first_answer,) = first_result.answers
    assert first_answer.regions  # no_code_fallback guarantees one
    serial = wiring.stream(first_result.answers, "Where is the liver?")
    first_chip = RegionLink(serial, first_answer.plane, first_answer.index, first_answer.regions[0].index)
    assert wiring.panel.on_region_clicked(first_chip)
    first_ref = weakref.ref(first)
    del first
    gc.collect()
    assert first_ref() is not None  # in the scene and remembered

    scene.Clear(0)  # File > Close scene
    assert resets, "closing the scene must reset the module"
    gc.collect()
    assert first_ref() is None  # the session (state, bound question, chips) holds nothing of it: its voxels are freed
    second_array = (np.arange(6 * 16 * 18).reshape(6, 16, 18) % 89).astype(np.int16)
    second = make_volume(scene, second_array, oblique_matrix(), name="second")
    assert second.GetID() == first_id  # Slicer restarts ID numbering: the trap this test is about

    add_slice_views(scene)
    assert not wiring.panel.on_region_clicked(first_chip)  # the first volume's answers are gone
    assert session.upload(second) != first_volume_id  # ... and so is its engine id
    session.bind(second)
    result = session.ask(second, "Where is the liver?", [2], options=SHORT)
    (answer,) = result.answers
    assert answer.index == 2 and answer.regions
    manager = session.suggestion_manager(second)
    assert manager.volume_node is second and manager.suggestion_ids()
    for node in preview_nodes(scene):  # at most the second volume's suggestions, on its grid
        assert node.GetName().startswith("second")
    for segment_id in manager.suggestion_ids():
        assert manager.suggestion_mask(segment_id).shape == second_array.shape
    assert first_result.answers[0].index == 1
    # Free MRML on the main thread (scene -> observer -> session -> scene is a cycle the collector could otherwise
    # break on the live server's worker thread).
    wiring.close()
    session.stop_observing()
    scene.Clear(1)
    gc.collect()


def test_answers_land_on_the_volume_the_question_was_about(app):
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    asked = make_volume(scene, np.zeros((4, 12, 10), np.int16), np.eye(4), name="asked")
    other = make_volume(scene, np.zeros((4, 12, 10), np.int16), np.eye(4), name="other")
    wiring = ModuleWiring(session, lambda: other)  # ... the user selects another volume while the engine works
    session.bind(asked)
    assert session.answer_volume() is asked  # where the module's review list puts streamed answers
    wiring.panel.last_model = "m"
    wiring.stream([slab_answer(asked, 2, slice(3, 6), slice(2, 5))], question="q")
    (suggested,) = session.suggestion_manager(asked).suggestion_ids()
    assert session.suggestion_manager(asked).suggestion_mask(suggested).sum() == 3 * 3
    assert wiring.host.list.review.manager is session.suggestion_manager(asked)  # the list shows where they went
    assert session.suggestion_manager(other).suggestion_ids() == []
    wiring.close()
    session.stop_observing()


def test_forgotten_volume_id_sends_the_bound_volume_again(url):
    """Two volumes with the same voxels and geometry get one engine id; when the engine forgets it, the voxels to send
    again are the bound volume's (its key then gets the new id), not the first volume that held the id."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    session.connect(url)
    voxels = (np.arange(3 * 12 * 10).reshape(3, 12, 10) % 61).astype(np.int16)
    first = make_volume(scene, voxels, np.diag([0.8, 0.8, 2.0, 1.0]), name="first")
    twin = make_volume(scene, voxels, np.diag([0.8, 0.8, 2.0, 1.0]), name="twin")
    shared = session.upload(first)
    assert session.upload(twin) == shared  # the engine's id is a hash of voxels and geometry
    session.bind(twin)  # the question that met "unknown_volume" was about the twin
    again = session.forget_volume_id(shared)
    assert again is not None and again.key == session.volume_key(twin) and again.key.startswith(f"{twin.GetID()}|")
    np.testing.assert_array_equal(again.array, voxels)
    assert not isinstance(session.volume_source(first), str)  # the stale id is gone from both
    assert not isinstance(session.volume_source(twin), str)
    session.bind(None)
    session.upload(first)
    session.upload(twin)
    assert session.forget_volume_id(shared).key == session.volume_key(first)  # nothing bound: the first holder
    session.stop_observing()



def test_a_volume_sent_again_mid_question_places_answers_through_the_grid_sent_again(url):
    """The question was sent, the user moved the volume's origin by one voxel, then the engine said it no longer has
    the volume: the voxels go again on the moved grid, so the answers come on that grid and land unshifted."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    session.connect(url)
    voxels = (np.arange(3 * 12 * 10).reshape(3, 12, 10) % 61).astype(np.int16)
    node = make_volume(scene, voxels, oblique_matrix(), name="CT")
    session.bind(node)
    sent = session.upload(node)
    move_grid(scene, node, "origin moved one voxel")
    again = session.forget_volume_id(sent)
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0]) @ again.origin,
                               (oblique_matrix() @ [1.0, 0.0, 0.0, 1.0])[:3], atol=1e-9)  # LPS: one voxel along i
    rows, cols = slice(2, 6), slice(3, 7)
    (suggestion,) = session.take_answers(node, [slab_answer(node, 1, rows, cols)], 1, "current")  # on the moved grid
    expected = np.zeros(voxels.shape, bool)
    expected[1, rows, cols] = True
    np.testing.assert_array_equal(session.suggestion_manager(node).suggestion_mask(suggestion), expected)
    session.stop_observing()


def test_removed_volume_takes_its_state_and_late_answers_are_dropped(app):
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    wiring = ModuleWiring(session, lambda: None)
    node = make_volume(scene, np.zeros((4, 12, 10), np.int16), np.eye(4), name="gone")
    late = slab_answer(node, 1, slice(2, 4), slice(2, 4))
    session.bind(node)
    wiring.stream([slab_answer(node, 1, slice(2, 4), slice(2, 4))])
    assert len(preview_nodes(scene)) == 1
    node_ref = weakref.ref(node)
    scene.RemoveNode(node)
    wiring.host.volume_changed(None)  # Slicer's volume selector reports that its node went
    del node
    gc.collect()
    assert node_ref() is None  # the session (state, bound question, chips) holds nothing of it: its voxels are freed
    assert preview_nodes(scene) == []
    assert session.answer_volume() is None
    wiring.stream([late])  # the engine was still answering: dropped, no preview node comes back
    assert preview_nodes(scene) == []
    wiring.close()
    session.stop_observing()


def test_segments_sit_under_the_volume_transform_and_views_centre_on_regions(app):
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    views = add_slice_views(scene)
    node = make_volume(scene, np.zeros((5, 20, 16), np.int16), oblique_matrix(), name="moved")
    transform = put_under_transform(scene, node)
    wiring = ModuleWiring(session, lambda: node)

    session.bind(node)
    answer = slab_answer(node, 3, slice(4, 9), slice(6, 11))
    serial = wiring.stream([answer], question="q")
    manager = session.suggestion_manager(node)
    assert manager.preview_node.GetTransformNodeID() == transform.GetID()
    manager.accept()
    assert manager.find_user_node().GetTransformNodeID() == transform.GetID()

    assert wiring.panel.on_region_clicked(RegionLink(serial, "axial", 3, 0))  # the answer's region chip
    region_ijk = np.array([(6 + 10) / 2.0, (4 + 8) / 2.0, 3.0, 1.0])
    expected = (parent_to_world(node) @ oblique_matrix() @ region_ijk)[:3]
    for view in views.values():
        np.testing.assert_allclose(view_origin(view), expected, atol=1e-6)  # centred, not just moved along the normal
    assert not wiring.panel.on_region_clicked(RegionLink(serial, "axial", 3, 1))  # the answer has no second region
    wiring.close()
    session.stop_observing()


def test_region_chip_centres_on_its_own_answer_and_volume():
    """Audit F2: a chip names its question, plane and slice; clicking the chip of an older axial answer after a coronal
    answer about the same slice number (and an answer on another volume) centres the views on the axial region."""
    from MedSIGHTSlicerLib.chat_panel import RegionLink, parse_region_url
    from MedSIGHTSlicerLib.qt_shim import qt

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    views = add_slice_views(scene)
    first = make_volume(scene, np.zeros((40, 40, 40), np.int16), np.eye(4), name="first")
    other = make_volume(scene, np.zeros((40, 40, 40), np.int16), oblique_matrix(), name="other")
    put_under_transform(scene, other)

    def answer(node, plane: str, axis: int, col: int, row: int, bbox) -> SliceAnswer:
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        mask = np.zeros((40, 40), bool)
        mask[bbox[0]:bbox[2] + 1, bbox[1]:bbox[3] + 1] = True
        region = Region("[M0_1]", "liver", 0, mask, 0.9, list(bbox))
        return SliceAnswer(plane, 5, "x", [region], ijk_to_ras @ pixel_to_ijk(axis, 5, col, row))

    # As the module's review list takes streamed answers: question 1 axial, 2 coronal, 3 axial on the other volume.
    session.take_answers(first, [answer(first, "axial", 2, 0, 1, (30, 30, 35, 35))], 1, "current", "q1")
    session.take_answers(first, [answer(first, "coronal", 1, 0, 2, (2, 2, 4, 4))], 2, "current", "q2")
    session.take_answers(other, [answer(other, "axial", 2, 0, 1, (10, 12, 14, 16))], 3, "current", "q3")

    chip = parse_region_url(qt.QUrl(RegionLink(1, "axial", 5, 0).url()).toString())  # as anchorClicked gives it
    assert session.jump_to_region_link(chip)
    for view in views.values():
        np.testing.assert_allclose(view_origin(view), [32.5, 32.5, 5.0], atol=1e-6)  # the axial region's centre
    assert session.jump_to_region_link(RegionLink(2, "coronal", 5, 0))
    np.testing.assert_allclose(view_origin(views["Red"]), [3.0, 5.0, 3.0], atol=1e-6)
    assert session.jump_to_region_link(RegionLink(3, "axial", 5, 0))
    expected = (parent_to_world(other) @ oblique_matrix() @ [14.0, 12.0, 5.0, 1.0])[:3]  # col 14, row 12
    np.testing.assert_allclose(view_origin(views["Red"]), expected, atol=1e-6)
    assert not session.jump_to_region_link(RegionLink(1, "coronal", 5, 0))  # question 1 said nothing coronal
    scene.RemoveNode(other)
    assert not session.jump_to_region_link(RegionLink(3, "axial", 5, 0))  # its volume is gone
    session.stop_observing()


def test_view_plane_follows_the_chosen_view():
    """Audit F5 (module side): the plane the range boxes follow when another view is chosen."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, np.zeros((3, 32, 32), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), name="slab")
    assert session.view_plane(node, "Yellow") is None  # no slice views in this scene yet
    add_slice_views(scene)
    assert [session.view_plane(node, name) for name in ("Red", "Yellow", "Green")] == ["axial", "sagittal", "coronal"]
    session.stop_observing()


def test_segments_drawn_in_the_preview_stay_when_the_volume_is_removed():
    """The Segment Editor pointed at the suggestions' preview (Correct... opens it there): a segment the user adds and
    draws there shares the suggestions' labelmap layer. Removing the volume drops the suggestions, not that segment."""
    from medsight_testing.review_scene import ct_voxels, organ_masks, segment_ids
    from MedSIGHTSlicerLib.suggestions import replace_segment_mask

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    voxels = ct_voxels()
    node = make_volume(scene, voxels, np.diag([0.8, 0.8, 2.5, 1.0]), name="CT")
    suggested = session.apply_answers(node, [slab_answer(node, 2, slice(4, 10), slice(4, 12))])
    manager = session.suggestion_manager(node)
    preview = manager.preview_node
    _, drawn = organ_masks(voxels.shape)
    drawn_id = preview.GetSegmentation().AddEmptySegment("", "my kidney")
    replace_segment_mask(preview, drawn_id, drawn, node)  # as an effect writes it (SetBinaryLabelmapToSegment)
    sharing: list[str] = []
    preview.GetSegmentation().GetSegmentIDsSharingBinaryLabelmapRepresentation(drawn_id, sharing, False)
    assert sharing == suggested  # one layer: the suggestion's voxels must go, the drawing's stay
    colour = preview.GetSegmentation().GetSegment(drawn_id).GetColor()

    scene.RemoveNode(node)
    assert preview_nodes(scene) == []  # the suggestions went with their volume
    kept = [n for n in nodes_by_class(scene, "vtkMRMLSegmentationNode") if segment_ids(n)]
    assert [n.GetName() for n in kept] == ["CT segments drawn among suggestions"]
    assert segment_ids(kept[0]) == [drawn_id]
    segment = kept[0].GetSegmentation().GetSegment(drawn_id)
    assert (segment.GetName(), segment.GetColor()) == ("my kidney", colour)
    np.testing.assert_array_equal(segment_array(kept[0], drawn_id, node), drawn)
    session.stop_observing()


def test_slice_counts_of_a_volume_before_any_question():
    """What the range boxes fit when the user chooses a volume: its slices per plane, read from the node."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    shape = (3, 20, 32)  # (k, j, i)
    node = make_volume(scene, np.zeros(shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), name="slab")
    assert session.slice_counts(node) == {"axial": shape[0], "coronal": shape[1], "sagittal": shape[2]}
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert session.slice_counts(empty) == {}
    session.stop_observing()


def test_accept_all_and_export_lookup_add_no_empty_nodes():
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, np.zeros((3, 8, 8), np.int16), np.eye(4), name="empty")
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    assert session.accept_all(node) == []
    assert session.user_segmentation(node) is None
    assert session.suggestion_manager(node).suggestion_ids() == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before


def test_export_takes_the_segmentation_accepted_into(tmp_path):
    """Two segmentations of the volume; the user accepts into the second ("Accept into"): Export writes that one."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, np.zeros((4, 12, 10), np.int16), np.eye(4), name="CT")
    nodes = {}
    for name in ("CT segmentation", "Second opinion"):
        nodes[name] = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        nodes[name].SetReferenceImageGeometryParameterFromVolumeNode(node)
    own, chosen = nodes.values()
    ids = session.apply_answers(node, [slab_answer(node, 1, slice(2, 6), slice(3, 7))])
    review = Review(session.suggestion_manager(node))
    review.set_target(chosen)
    (accepted,) = review.accept(ids)
    assert session.user_segmentation(node) is own  # no choice given: the volume's own
    assert session.user_segmentation(node, review.target) is chosen
    written = read_seg_nrrd(export_seg_nrrd(session.user_segmentation(node, review.target), tmp_path / "x.seg.nrrd"),
                            scene)
    assert written.GetSegmentation().GetNumberOfSegments() == 1
    np.testing.assert_array_equal(segment_array(written, accepted, node), segment_array(chosen, accepted, node))
    scene.RemoveNode(chosen)  # the choice left the scene: back to the own one
    assert session.user_segmentation(node, review.target) is own
    session.stop_observing()


def test_tags_with_separators_survive_a_seg_nrrd_reload(tmp_path, app):
    """Slicer writes segment tags as key:value| unescaped; a question with | or : must come back unchanged."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, np.zeros((4, 12, 10), np.int16), np.eye(4), name="tags")
    wiring = ModuleWiring(session, lambda: node)
    question = "Liver: left|right lobe? 100% sure"
    session.model_name = "demo: v1|b"
    session.bind(node)
    wiring.stream([slab_answer(node, 2, slice(3, 6), slice(2, 5), label="liver|x")], question=question)
    wiring.close()
    manager = session.suggestion_manager(node)
    manager.accept()
    path = export_seg_nrrd(manager.find_user_node(), tmp_path / "tags.seg.nrrd")
    fresh = read_seg_nrrd(path, slicer.vtkMRMLScene())
    segmentation = fresh.GetSegmentation()
    segment = segmentation.GetNthSegment(0)
    assert get_tag(segment, TAG_QUESTION) == question
    assert get_tag(segment, TAG_MODEL) == "demo: v1|b"
    assert get_tag(segment, TAG_LABEL) == "liver|x"


class DicomDatabase:
    """The one call of Slicer's ctkDICOMDatabase the session makes (slicer-core has no DICOM database)."""

    def __init__(self, values: dict[tuple[str, str], str]) -> None:
        self.values = values

    def instanceValue(self, uid: str, tag: str) -> str:  # noqa: N802 (ctkDICOMDatabase's name)
        return self.values.get((uid, tag), "")


def test_a_volume_from_dicom_is_sent_with_its_own_modality():
    """A CT cropped inside the body has no air, so its voxels alone look like MR (percentile window instead of the
    CT window): its DICOM Modality decides."""
    from MedSIGHTSlicerLib.dicom_seg import INSTANCE_UIDS_ATTRIBUTE, MODALITY_TAG

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, np.full((3, 8, 8), 40, np.int16), np.eye(4), name="cropped CT")
    assert session.volume_source(node).modality == "MR"  # what the voxels alone suggest
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, "1.2.3.1 1.2.3.2 1.2.3.3")
    session.dicom_database = lambda: DicomDatabase({("1.2.3.1", MODALITY_TAG): "CT "})
    assert session.volume_source(node).modality == "CT"
    session.dicom_database = lambda: DicomDatabase({})  # the database no longer knows the series
    assert session.volume_source(node).modality == "MR"
    node.SetAttribute("MedSIGHT.Modality", "PT")  # set by a script: it wins
    session.dicom_database = lambda: DicomDatabase({("1.2.3.1", MODALITY_TAG): "CT"})
    assert session.volume_source(node).modality == "PT"


def test_a_ct_with_nan_voxels_is_sent_as_ct():
    """A float CT with NaN outside its field of view (a resampled or registered CT: the engine reads them as its
    smallest value) was guessed "MR" from one NaN voxel (np.min is NaN, never below -500), so the engine picked an MR
    window for Hounsfield units."""
    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    voxels = np.full((3, 8, 8), 40.0, np.float32)
    voxels[:, :2, :] = -1000.0  # air
    node = make_volume(scene, voxels, np.eye(4), name="CT", dtype=np.float32)
    assert session.volume_source(node).modality == "CT"
    voxels[:, :, :1] = np.nan
    with_nan = make_volume(scene, voxels, np.eye(4), name="resampled CT", dtype=np.float32)
    source = session.volume_source(with_nan)
    assert int(np.isnan(source.array).sum()) == voxels.shape[0] * voxels.shape[1]  # sent as they are
    assert source.modality == "CT"


def set_grid(volume, matrix: np.ndarray) -> None:
    """Edit the volume's IJK-to-RAS, as the Volumes module's origin, spacing and direction fields do."""
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    volume.SetIJKToRASMatrix(vtk_matrix)


def move_grid(scene, volume, move: str) -> None:
    """What the user does to the volume's grid while a question about it runs."""
    from MedSIGHTSlicerLib.geometry import ijk_to_ras

    matrix = ijk_to_ras(volume)
    if move == "origin moved one voxel":  # a whole voxel: the old placement would fit the grid, on wrong voxels
        matrix[:3, 3] += matrix[:3, 0]
        set_grid(volume, matrix)
    elif move == "spacing edited":  # a non-integer change: the old placement was refused as "another volume"
        matrix[:3, :3] *= 1.3
        set_grid(volume, matrix)
    else:  # a transform hardened into the voxels (turned and shifted)
        put_under_transform(scene, volume)
        volume.HardenTransform()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def run_question(app, panel, scope: str, first: int = 0, last: int = 0) -> None:
    from medsight_testing.chat import wait_until_answered

    panel.set_scope(scope, first, last)
    assert panel.send("Where is the liver?")
    wait_until_answered(app, panel, 300)


@pytest.mark.parametrize("move", ["origin moved one voxel", "spacing edited", "transform hardened"])
def test_answers_arriving_after_the_grid_moved_land_on_the_voxels_asked_about(url, app, move):
    """A range question streams in; after its first answer the user moves the volume's grid. Every answer, earlier
    and later ones, must end on the voxels the engine computed it for (the engine's slice-to-RAS is on the grid that
    was sent): Dice 1 against the same answers placed on a volume that never moved, and chips centre on them."""
    from medsight_testing.review_scene import ct_voxels
    from MedSIGHTSlicerLib.geometry import ijk_to_ras
    from MedSIGHTSlicerLib.suggestions import SuggestionManager
    from MedSIGHTSlicerLib.views import region_centre_ras

    scene = slicer.vtkMRMLScene()
    views = add_slice_views(scene)
    session = MedSIGHTSession(scene)
    session.connect(url)
    voxels = ct_voxels()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    sent_grid = ijk_to_ras(volume)
    wiring = ModuleWiring(session, lambda: volume)
    panel = wiring.panel
    panel.set_client(session.client)
    panel.options = dict(SHORT)
    panel.volume_provider = lambda: session.bind(volume) or session.volume_source(volume)  # the module's
    answers = []
    take = panel.on_region_answers

    def on_region_answers(arrived) -> None:
        take(arrived)
        first = not answers
        answers.extend(arrived)
        if first:  # after the first request's answer (one slice)
            move_grid(scene, volume, move)

    panel.on_region_answers = on_region_answers
    try:
        run_question(app, panel, "range", 0, voxels.shape[0] - 1)
        assert panel.error.text() == ""
        assert len(answers) == voxels.shape[0]  # answers arrived after the move (every slice has a region here)
        still = make_volume(scene, voxels, oblique_matrix(), name="never moved")
        expected = SuggestionManager(scene, still)
        expected.add_answers(answers)
        manager = session.suggestion_manager(volume)
        # Paired by name (one finding each; a finding's slices may list in another order than the live ones).
        got = {manager.suggestion(sid).GetName(): manager.suggestion_mask(sid) for sid in manager.suggestion_ids()}
        wanted = {expected.suggestion(sid).GetName(): expected.suggestion_mask(sid)
                  for sid in expected.suggestion_ids()}
        assert sorted(got) == sorted(wanted) and len(wanted) == len(expected.suggestion_ids()) > 0
        assert {name: round(dice(got[name], mask), 6) for name, mask in wanted.items()} == dict.fromkeys(wanted, 1.0)

        first = answers[0]  # asked and placed before the move: its chip centres on its voxels where they are now
        region = next(r for r in first.regions if r.bbox is not None)
        assert session.jump_to_region_link(RegionLink(panel.ask_serial, first.plane, first.index, region.index))
        centre = region_centre_ras(first.slice_to_ras, region.bbox)
        now = parent_to_world(volume) @ ijk_to_ras(volume) @ np.linalg.inv(sent_grid) @ np.append(centre, 1.0)
        np.testing.assert_allclose(view_origin(views["Red"]), now[:3], atol=1e-6)
    finally:
        panel.close()
        app.processEvents()
        wiring.close()
        session.stop_observing()
        scene.Clear(1)


def test_a_current_slice_answer_after_the_grid_moved_lands_on_the_voxels_asked_about(url, app):
    """"Current slice" asks about the slice in the Red view; the user moves the volume's origin by one voxel before
    the answer arrives: its suggestions go on the voxels of the slice that was asked about."""
    from medsight_testing.review_scene import ct_voxels
    from MedSIGHTSlicerLib.geometry import ijk_to_ras
    from MedSIGHTSlicerLib.suggestions import SuggestionManager
    from MedSIGHTSlicerLib.views import centre_views_on

    scene = slicer.vtkMRMLScene()
    views = add_slice_views(scene)
    session = MedSIGHTSession(scene)
    session.connect(url)
    voxels = ct_voxels()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    views["Red"].RotateToVolumePlane(volume)  # the view shows a native slice, through the volume's middle
    centre_views_on(scene, (ijk_to_ras(volume) @ [*(np.array(voxels.shape[::-1]) // 2), 1.0])[:3], volume)
    wiring = ModuleWiring(session, lambda: volume)
    panel = wiring.panel
    panel.set_client(session.client)
    panel.options = dict(SHORT)
    panel.volume_provider = lambda: session.bind(volume) or session.volume_source(volume)
    panel.current_slice_provider = lambda: session.current_view(volume, "Red")
    answers = []
    take = panel.on_region_answers
    panel.on_region_answers = lambda arrived: (take(arrived), answers.extend(arrived))
    send = panel.send

    def send_then_move(question=None) -> bool:
        sent = send(question)
        move_grid(scene, volume, "origin moved one voxel")  # the upload and the view went with the send
        return sent

    panel.send = send_then_move
    try:
        run_question(app, panel, "current")
        assert panel.error.text() == ""
        (answer,) = answers
        still = make_volume(scene, voxels, oblique_matrix(), name="never moved")
        expected = SuggestionManager(scene, still)
        manager = session.suggestion_manager(volume)
        wanted = [expected.suggestion_mask(sid) for sid in expected.add_answer(answer)]
        got = [manager.suggestion_mask(sid) for sid in manager.suggestion_ids()]
        assert len(got) == len(wanted) > 0
        assert [round(dice(a, b), 6) for a, b in zip(got, wanted)] == [1.0] * len(wanted)  # one slice: same order
    finally:
        panel.close()
        app.processEvents()
        wiring.close()
        session.stop_observing()
        scene.Clear(1)


def test_answers_about_voxels_replaced_while_the_question_ran_are_not_placed(url, app):
    """The volume's voxels are replaced by another array (e.g. cropped in place) while a range question runs: the
    later answers belong to the old voxels, and are refused with a message saying so, never put on the new ones."""
    from vtk.util import numpy_support

    from medsight_testing.review_scene import ct_voxels

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    session.connect(url)
    voxels = ct_voxels()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    wiring = ModuleWiring(session, lambda: volume)
    panel = wiring.panel
    panel.set_client(session.client)
    panel.options = dict(SHORT)
    panel.volume_provider = lambda: session.bind(volume) or session.volume_source(volume)
    answers = []
    take = panel.on_region_answers

    def on_region_answers(arrived) -> None:
        first = not answers
        answers.extend(arrived)
        take(arrived)  # raises for the answers after the crop (the panel shows it)
        if first:  # cropped to the first half of the slices, after the first request's answer (one slice)
            cropped = voxels[: voxels.shape[0] // 2]
            image = vtk.vtkImageData()
            image.SetDimensions(*cropped.shape[::-1])
            image.AllocateScalars(vtk.VTK_SHORT, 1)
            numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = cropped.reshape(-1)
            volume.SetAndObserveImageData(image)

    panel.on_region_answers = on_region_answers
    try:
        manager = session.suggestion_manager(volume)
        run_question(app, panel, "range", 0, voxels.shape[0] - 1)
        assert len(answers) == voxels.shape[0]
        assert "were replaced by another grid size while the question ran" in panel.error.text()
        assert "40x32x7 voxels when asked, 40x32x3 now" in panel.error.text()
        slices = {get_tag(manager.suggestion(sid), "MedSIGHT.Slice") for sid in manager.suggestion_ids()}
        assert slices == {"axial:0"}  # only the answer placed before the voxels changed
    finally:
        panel.close()
        app.processEvents()
        wiring.close()
        session.stop_observing()
        scene.Clear(1)


@pytest.mark.parametrize("move", ["origin moved one voxel", "spacing edited", "transform hardened", "put under"])
def test_the_preview_follows_the_volume_as_soon_as_it_moves(move):
    """The user moves the volume (Volumes module, a hardened transform, a new parent transform) and looks: the
    suggestions sit on the same voxels at once, before the list or an answer reads them again."""
    from medsight_testing.mrml import mask_world_points, world_points
    from medsight_testing.review_scene import ct_voxels

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, ct_voxels(), oblique_matrix(), name="CT")
    (suggestion,) = session.apply_answers(node, [slab_answer(node, 2, slice(4, 10), slice(4, 12))])
    manager = session.suggestion_manager(node)
    mask, preview = manager.suggestion_mask(suggestion), manager.preview_node
    if move == "put under":
        put_under_transform(scene, node)
    else:
        move_grid(scene, node, move)
    np.testing.assert_allclose(world_points(preview, suggestion), mask_world_points(node, mask), atol=1e-6)
    scene.RemoveNode(node)  # its observers go with its state
    session.stop_observing()


def test_a_stopped_session_leaves_the_preview_to_the_reloaded_one():
    """A developer Reload (Slicer v5.8.0 Base/Python/slicer/util.py:1432-1460, reloadScriptedModule) calls the old
    widget's cleanup and sets up a new widget, but only hides the old one's Qt widgets: their connections keep the old
    widget, and its session, alive. cleanup's stop_observing removed the scene observers only, so the old session's
    volume observers still moved the preview when the volume moved, and the new session's moved it again: after a
    one-voxel origin move the suggestion sat a voxel off (0.74 mm on this grid). Now the stopped session lets go."""
    from medsight_testing.mrml import mask_world_points, world_points
    from medsight_testing.review_scene import ct_voxels

    scene = slicer.vtkMRMLScene()
    old = MedSIGHTSession(scene)
    node = make_volume(scene, ct_voxels(), oblique_matrix(), name="CT")
    (suggestion,) = old.apply_answers(node, [slab_answer(node, 2, slice(4, 10), slice(4, 12))])
    old_manager = old.suggestion_manager(node)
    mask, old_preview = old_manager.suggestion_mask(suggestion), old_manager.preview_node
    old.stop_observing()  # the old widget's cleanup
    new = MedSIGHTSession(scene)
    preview = new.suggestion_manager(node).existing_preview_node()  # the new widget's list shows the suggestions
    assert preview is old_preview
    move_grid(scene, node, "origin moved one voxel")
    np.testing.assert_allclose(world_points(preview, suggestion), mask_world_points(node, mask), atol=1e-6)
    scene.RemoveNode(node)
    new.stop_observing()


def test_a_stopped_session_lets_its_volumes_go():
    """The old widget's session outlives a developer Reload (see above), but no scene close reaches it once it stopped
    observing: it held every volume it had seen, with their voxels, for the rest of the Slicer session (the image's
    reference count after the scene closed: 3; 1, the test's own, when nothing else holds it)."""
    from medsight_testing.review_scene import ct_voxels

    scene = slicer.vtkMRMLScene()
    old = MedSIGHTSession(scene)
    node = make_volume(scene, ct_voxels(), oblique_matrix(), name="CT")
    assert old.apply_answers(node, [slab_answer(node, 2, slice(4, 10), slice(4, 12))])
    assert old.suggestion_manager(node).accept()  # an accepted segment and the undo history too
    image = node.GetImageData()
    old.stop_observing()  # the old widget's cleanup
    del node
    scene.Clear(0)
    gc.collect()
    assert image.GetReferenceCount() == 1


def test_ask_after_an_engine_restart_sends_the_volume_again(engine):
    """``session.ask`` (scripts) after the engine restarted: the cached volume id was sent again on every ask and
    refused ("unknown_volume", whose hint says to ask again, which failed the same way); the volume is sent once more
    and the question answered."""
    import medsight.server.app
    from medsight_testing.live_server import free_port, live_server

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    port = free_port()
    voxels = (np.arange(3 * 12 * 10).reshape(3, 12, 10) % 61).astype(np.int16)
    node = make_volume(scene, voxels, np.diag([0.8, 0.8, 2.0, 1.0]), name="CT")
    with live_server(medsight.server.app.create_app(engine), port=port) as url:
        session.connect(url)
        volume_id = session.upload(node)
    with live_server(medsight.server.app.create_app(engine), port=port):  # the same URL, a fresh engine
        result = session.ask(node, "Where is the liver?", [1], options=SHORT)
        assert [a.index for a in result.answers] == [1]
        assert session.volume_source(node) == volume_id  # sent again: the same voxels get the same id, cached
        assert session.client.volume_info(volume_id).shape == voxels.shape
    session.stop_observing()


def test_an_answer_about_voxels_resampled_in_place_to_the_same_counts_is_not_placed():
    # Only the voxel counts were compared: an answer arriving after the volume was resampled in place to half its
    # spacing (same counts) was placed on the new voxels by index, as a suggestion taken as made on them, and accepted
    # onto 21 voxels none of which were the organ it found.
    scene, volume, voxels = ct_scene()
    session = MedSIGHTSession(scene)
    try:
        manager = session.suggestion_manager(volume)
        session.bind(volume)
        rows, cols = slice(12, 20), slice(16, 24)
        found = slab_answer(volume, 2, rows=rows, cols=cols)
        resample_in_place(volume, 0.5)
        size = "x".join(str(n) for n in voxels.shape[::-1])
        with pytest.raises(GeometryError, match=re.escape(f"the voxels of 'CT' were replaced while the question ran "
                                                          f"(resampled or changed in place: {size} voxels as when "
                                                          "asked, other values)")):
            session.take_answers(volume, [found], 1, "current", "Where is the organ?")
        assert manager.suggestion_ids() == []
        # Asked again about the new voxels: placed; and a grid moved meanwhile (same values) keeps them on them.
        session.bind(volume)
        again = slab_answer(volume, 2, rows=rows, cols=cols)
        grid = ijk_to_ras(volume)
        grid[:3, 3] += grid[:3, 0]
        volume.SetIJKToRASMatrix(vtk_matrix(grid))
        [sid] = session.take_answers(volume, [again], 2, "current", "Where is the organ?")
        expected = np.zeros(voxels.shape, dtype=bool)  # the voxels it was found on, not one voxel beside them
        expected[2, rows, cols] = True
        np.testing.assert_array_equal(manager.suggestion_mask(sid), expected)
    finally:
        session.stop_observing()
