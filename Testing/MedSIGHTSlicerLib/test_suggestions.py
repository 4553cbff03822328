"""SuggestionManager with real MRML nodes: answers to 3D suggestions, accept/reject/undo/redo, user segments intact."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from medsight_testing.mrml import mask_world_points, oversampled, pixel_to_ijk, put_under_transform, world_points  # noqa: E402
from medsight_testing.review_scene import (  # noqa: E402
    delete_and_undo_in_segment_editor,
    resample_in_place,
    segment_ids,
)
from MedSIGHTSlicerLib.geometry import (  # noqa: E402
    GeometryError,
    ijk_to_ras,
    labelmap_from_array,
    nodes_by_class,
    segment_array,
    vtk_matrix,
)
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer  # noqa: E402
from MedSIGHTSlicerLib.review import Review  # noqa: E402
from MedSIGHTSlicerLib.suggestions import (  # noqa: E402
    ALL,
    TAG_CONFIDENCE,
    TAG_MODEL,
    TAG_QUESTION,
    TAG_REGION_CODE,
    TAG_SLICE,
    SuggestionError,
    SuggestionManager,
    get_tag,
    replace_segment_mask,
    voxel_set_digest,
)

SHAPE = (8, 10, 12)  # (k, j, i)


def oblique_matrix() -> np.ndarray:
    c, s = np.cos(np.radians(17)), np.sin(np.radians(17))
    rotation = np.array([[c, -s, 0], [s * 0.8, c * 0.8, -0.6], [s * 0.6, c * 0.6, 0.8]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.0])
    matrix[:3, 3] = [5.0, -20.0, 33.0]
    return matrix


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def volume(scene):
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = 0
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("CT")
    scene.AddNode(node)
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, oblique_matrix()[r, c])
    node.SetIJKToRASMatrix(matrix)
    return node


def ball(centre=(4, 5, 6), radius=2.6) -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def answer(plane: str, index: int, regions: list[tuple[str, np.ndarray]], prob: float = 0.9) -> SliceAnswer:
    """An engine answer about an array-slab slice whose region masks are the given 3D masks cut at that slice."""
    normal, col, row = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}[plane]
    p2i = pixel_to_ijk(normal, index, col, row)
    shape_ijk = SHAPE[::-1]
    rows, cols = shape_ijk[row], shape_ijk[col]
    r, c = np.mgrid[0:rows, 0:cols]
    i, j, k = np.rint(p2i @ np.stack([c.ravel(), r.ravel(), 0 * r.ravel(), 1 + 0 * r.ravel()]))[:3].astype(int)
    out = [
        Region(f"[M{index}_{n}]", label, n, mask3d[k, j, i].reshape(rows, cols), prob, None)
        for n, (label, mask3d) in enumerate(regions)
    ]
    return SliceAnswer(plane, index, f"The {regions[0][0]} is here.", out, oblique_matrix() @ p2i)


def add_user_segment(node, volume, name: str, mask: np.ndarray) -> str:
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap_from_array(mask, volume)
    )
    segment_id = node.GetSegmentation().GenerateUniqueSegmentID("user")
    assert node.GetSegmentation().AddSegment(segment, segment_id)
    return segment_id


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture
def user_node(scene, volume):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName("CT segmentation")
    scene.AddNode(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def user_hashes(node, volume, ids) -> dict[str, str]:
    return {sid: hashlib.sha1(segment_array(node, sid, volume).tobytes()).hexdigest() for sid in ids}


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_whole_volume_answer_is_one_3d_segment(scene, volume, plane):
    manager = SuggestionManager(scene, volume, model="medsight-test 0.1")
    target = ball()
    normal = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]  # array axis of the plane's normal, (k, j, i)
    answers = [answer(plane, n, [("liver", target)]) for n in range(SHAPE[normal])]
    ids = manager.add_answers(answers, question="Where is the liver?")
    assert len(ids) == 1
    assert dice(manager.suggestion_mask(ids[0]), target) == 1.0
    segment = manager.suggestion(ids[0])
    assert segment.GetName() == "Liver"
    assert get_tag(segment, TAG_MODEL) == "medsight-test 0.1"
    assert get_tag(segment, TAG_QUESTION) == "Where is the liver?"
    assert float(get_tag(segment, TAG_CONFIDENCE)) == pytest.approx(0.9)
    assert get_tag(segment, TAG_SLICE).startswith(f"{plane}:")
    assert "[M" in get_tag(segment, TAG_REGION_CODE)
    assert "SCT^10200004^Liver" in get_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
    [user_id] = manager.accept(ids[0])
    user = manager.user_segmentation_node()
    assert user.GetName() == "CT segmentation"
    assert dice(segment_array(user, user_id, volume), target) == 1.0
    assert manager.suggestion_ids() == []


def test_single_answer_regions_stay_separate_with_distinct_colours(scene, volume):
    manager = SuggestionManager(scene, volume)
    a, b = ball((4, 3, 3), 1.5), ball((4, 6, 8), 1.5)
    ids = manager.add_answer(answer("axial", 4, [("lesion", a), ("lesion", b), ("", ball((4, 5, 5), 0.5))]))
    assert len(ids) == 3
    names = [manager.suggestion(sid).GetName() for sid in ids]
    assert names[:2] == ["Lesion", "Lesion"] and names[2] == "[M4_2]"  # no label: the code names it
    colours = {tuple(round(c, 3) for c in manager.suggestion(sid).GetColor()) for sid in ids}
    assert len(colours) == 3


def test_name_clash_gets_a_suffix_and_user_segment_is_untouched(scene, volume, user_node):
    user_id = add_user_segment(user_node, volume, "Liver", ball((2, 2, 2), 1.5))
    before = user_hashes(user_node, volume, [user_id])
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [new_id] = manager.accept(ids)
    assert manager.user_segmentation_node() is user_node
    assert user_node.GetSegmentation().GetSegment(new_id).GetName() == "Liver (2)"
    assert user_hashes(user_node, volume, [user_id]) == before


def test_reject_undo_redo(scene, volume):
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    assert manager.reject(ids[0]) == [ids[0]]
    assert manager.suggestion_ids() == [ids[1]]
    assert manager.undo()
    assert manager.suggestion_ids() == ids  # order restored
    assert manager.redo()
    assert manager.suggestion_ids() == [ids[1]]
    assert not manager.redo()
    with pytest.raises(SuggestionError):
        manager.reject("nope")


@pytest.mark.parametrize("action", ["reject", "accept"])
def test_a_hidden_suggestion_comes_back_hidden_on_undo(scene, volume, action):
    # Hidden (Show/Hide), then rejected or accepted: the undo brought it back shown.
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    review.set_visible([ids[0]], False)
    getattr(manager, action)(ids)
    assert manager.undo()
    assert [(row.segment_id, row.visible) for row in review.rows()] == [(ids[0], False), (ids[1], True)]
    review.set_visible([ids[0]], True)  # shown again before the redo: its undo brings it back shown
    assert manager.redo() and manager.undo()
    assert [row.visible for row in review.rows()] == [True, True]


def test_undo_accept_refuses_when_user_edited_it(scene, volume):
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [user_id] = manager.accept(ids)
    user = manager.user_segmentation_node()
    edited = ball((4, 5, 6), 1.0)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap_from_array(edited, volume), user, user_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    with pytest.raises(SuggestionError, match="edited"):
        manager.undo()
    np.testing.assert_array_equal(segment_array(user, user_id, volume), edited)


@pytest.mark.parametrize("change", ["deleted", "edited"])
def test_an_accept_changed_since_is_refused_once_and_the_steps_before_stay_undoable(scene, volume, change):
    manager = SuggestionManager(scene, volume)
    organs = [("liver", ball((4, 5, 6), 2.0)), ("kidney", ball((4, 2, 9), 1.5)), ("spleen", ball((4, 7, 2), 1.2))]
    ids = manager.add_answer(answer("axial", 4, organs))
    masks = {segment_id: manager.suggestion_mask(segment_id) for segment_id in ids}
    assert len(ids) == len(organs) and all(mask.any() for mask in masks.values())
    manager.reject(ids[2])
    [liver_id] = manager.accept(ids[0])
    [kidney_id] = manager.accept(ids[1])
    user = manager.find_user_node()
    kept = {liver_id: segment_array(user, liver_id, volume)}
    if change == "deleted":
        user.GetSegmentation().RemoveSegment(kidney_id)
    else:
        user.GetSegmentation().GetSegment(kidney_id).SetName("Left kidney")
        kept[kidney_id] = segment_array(user, kidney_id, volume) | ball((1, 2, 2), 1.0)
        replace_segment_mask(user, kidney_id, kept[kidney_id], volume)
    name = "Kidney" if change == "deleted" else "Left kidney"
    with pytest.raises(SuggestionError, match=rf"'{name}'.*{change} since.*Undo again"):
        manager.undo()
    # Nothing the user has changed: their segments as they were, the step gone from the history.
    assert segment_ids(user) == list(kept)
    for segment_id, mask in kept.items():
        np.testing.assert_array_equal(segment_array(user, segment_id, volume), mask)
    assert manager.suggestion_ids() == []
    assert not manager.can_redo
    # The earlier steps undo as ever: the liver comes back to the list, then the rejected spleen.
    assert manager.undo()
    assert manager.suggestion_ids() == [ids[0]]
    assert segment_ids(user) == list(kept)[1:]
    assert manager.undo()
    assert manager.suggestion_ids() == [ids[0], ids[2]]
    for segment_id in manager.suggestion_ids():
        np.testing.assert_array_equal(manager.suggestion_mask(segment_id), masks[segment_id])
    assert not manager.can_undo and not manager.undo()


def test_an_accept_into_a_segmentation_removed_since_names_it_when_undo_refuses(scene, volume, user_node):
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    manager.reject(ids[1])
    other = slicer.vtkMRMLSegmentationNode()
    other.SetName("Second opinion")
    scene.AddNode(other)
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    manager.accept(ids[0], target=other)
    scene.RemoveNode(other)
    with pytest.raises(SuggestionError, match=re.escape("accepting 'Liver': the segmentation it went into "
                                                        "('Second opinion') was removed")):
        manager.undo()
    assert manager.undo() and manager.suggestion_ids() == ids[1:]  # the reject before it
    assert segment_ids(user_node) == []


def test_a_name_and_colour_given_between_a_redo_and_its_undo_come_back(scene, volume):
    manager = SuggestionManager(scene, volume)
    (sid,) = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    [user_id] = manager.accept([sid])
    assert manager.undo() and manager.redo()
    user = manager.find_user_node()
    segment = user.GetSegmentation().GetSegment(user_id)
    segment.SetName("Liver, checked")
    segment.SetColor(0.1, 0.2, 0.3)
    assert manager.undo()
    looks = lambda s: (s.GetName(), tuple(round(c, 6) for c in s.GetColor()))  # noqa: E731
    assert looks(manager.suggestion(sid)) == ("Liver, checked", (0.1, 0.2, 0.3))
    # Renamed once more in the preview (Segment Editor) before the redo: the redo accepts it under that name.
    manager.suggestion(sid).SetName("Liver, right lobe")
    assert manager.redo()
    assert looks(user.GetSegmentation().GetSegment(user_id)) == ("Liver, right lobe", (0.1, 0.2, 0.3))
    np.testing.assert_array_equal(segment_array(user, user_id, volume), mask)


def test_an_undone_accept_gives_the_row_its_own_name_not_the_one_the_accept_gave(scene, volume, user_node):
    # Accepted beside the user's "Liver" as "Liver (2)", the undo put the suggestion back in the list as "Liver (2)".
    add_user_segment(user_node, volume, "Liver", ball((2, 2, 2), 1.5))
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [user_id] = manager.accept(sid, target=user_node)
    assert user_node.GetSegmentation().GetSegment(user_id).GetName() == "Liver (2)"
    assert manager.undo() and manager.suggestion(sid).GetName() == "Liver"
    assert manager.redo() and user_node.GetSegmentation().GetSegment(user_id).GetName() == "Liver (2)"
    user_node.GetSegmentation().GetSegment(user_id).SetName("Liver, left lobe")  # the user's own name goes back
    assert manager.undo() and manager.suggestion(sid).GetName() == "Liver, left lobe"


def test_a_terminology_chosen_for_an_accepted_segment_survives_its_undo_and_redo(scene, volume):
    # Slicer's terminology picker sets name, colour and terminology together: the undo and redo kept the name and
    # colour but put the suggestion's terminology back, so "Right kidney" was exported coded as a kidney of no side.
    from MedSIGHTSlicerLib import naming

    terminology = slicer.vtkSegment.GetTerminologyEntryTagName()
    manager = SuggestionManager(scene, volume)
    (sid,) = manager.add_answer(answer("axial", 4, [("kidney", ball())]))
    assert get_tag(manager.suggestion(sid), terminology) == naming.terminology_entry("kidney")
    [user_id] = manager.accept([sid])
    user = manager.find_user_node()
    segment = user.GetSegmentation().GetSegment(user_id)
    segment.SetName("Right kidney")
    segment.SetTag(terminology, naming.terminology_entry("right kidney"))
    assert manager.undo()
    assert get_tag(manager.suggestion(sid), terminology) == naming.terminology_entry("right kidney")
    assert manager.redo()
    segment = user.GetSegmentation().GetSegment(user_id)
    assert segment.GetName() == "Right kidney"
    assert naming.Term.parse(get_tag(segment, terminology)).modifier.meaning == "Right"


def test_redo_refuses_when_the_suggestion_was_corrected_after_the_undo(scene, volume):
    manager = SuggestionManager(scene, volume)
    (sid,) = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [user_id] = manager.accept([sid])
    user = manager.user_segmentation_node()
    assert manager.undo()
    # Corrected in the Segment Editor after the undo (as its Paint effect writes it).
    stroke = ball((4, 5, 9), 1.5)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(labelmap_from_array(stroke, volume), manager.preview_node, sid,
                                            logic.MODE_MERGE_MAX)
    corrected = manager.suggestion_mask(sid)
    assert corrected.sum() > stroke.sum()
    with pytest.raises(SuggestionError, match="edited since the undo"):
        manager.redo()  # it would accept the voxels from before the correction and drop the corrected suggestion
    np.testing.assert_array_equal(manager.suggestion_mask(sid), corrected)
    assert user.GetSegmentation().GetSegment(user_id) is None
    # Accepting it again takes the correction.
    [again] = manager.accept([sid])
    np.testing.assert_array_equal(segment_array(user, again, volume), corrected)


def test_redo_of_a_merge_into_a_removed_segmentation_touches_no_other(scene, volume, user_node):
    own_id = add_user_segment(user_node, volume, "Liver", ball((4, 5, 6), 2.0))
    other = slicer.vtkMRMLSegmentationNode()
    other.SetName("Second opinion")
    scene.AddNode(other)
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    other_id = add_user_segment(other, volume, "Kidney", ball((2, 2, 2), 1.5))
    assert other_id == own_id  # the same id in both: the merge must never land in the wrong node
    before = user_hashes(user_node, volume, [own_id])
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("lesion", ball((4, 7, 8), 1.5))]))
    assert manager.accept(ids, target=other, merge_into=other_id) == [other_id]
    assert manager.undo()
    scene.RemoveNode(other)
    with pytest.raises(SuggestionError, match="Second opinion"):
        manager.redo()
    assert user_hashes(user_node, volume, [own_id]) == before
    assert manager.suggestion_ids() == ids


def test_redo_of_an_accept_into_a_removed_segmentation_is_refused_not_redirected(scene, volume, user_node):
    # The redo put the accepted segment into the user's own segmentation instead, without a word.
    own_id = add_user_segment(user_node, volume, "Liver", ball((4, 5, 6), 2.0))
    before = user_hashes(user_node, volume, [own_id])
    other = slicer.vtkMRMLSegmentationNode()
    other.SetName("Second opinion")
    scene.AddNode(other)
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("lesion", ball((4, 7, 8), 1.5))]))
    manager.accept(ids, target=other)
    assert manager.undo()
    scene.RemoveNode(other)
    with pytest.raises(SuggestionError, match=re.escape("cannot redo accepting 'Lesion': the segmentation 'Second "
                                                        "opinion' it went into was removed since")):
        manager.redo()
    assert segment_ids(user_node) == [own_id] and user_hashes(user_node, volume, [own_id]) == before
    assert manager.suggestion_ids() == ids
    [again] = manager.accept(ids)  # accepting it again goes where the user chooses now
    assert segment_ids(user_node) == [own_id, again]


@pytest.mark.parametrize("merge", [False, True])
def test_redo_into_a_segmentation_made_surface_based_since_is_refused(scene, volume, user_node, merge):
    # Made closed-surface based after the undo (Segmentations module > Representations), the redo still went into it:
    # the accepted voxels became a surface (7 of the suggestion's 21 voxels read back), and a merge's redo failed with
    # "could not write segment".
    own_id = add_user_segment(user_node, volume, "Organ", ball((4, 5, 9), 1.5))
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into=own_id if merge else None)
    assert manager.undo()
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert user_node.GetSegmentation().CreateRepresentation(surface)
    user_node.GetSegmentation().SetSourceRepresentationName(surface)
    with pytest.raises(SuggestionError, match="cannot redo: 'CT segmentation' keeps its segments as closed surfaces"):
        manager.redo()
    assert segment_ids(user_node) == [own_id] and manager.suggestion_ids() == [sid]
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)


def test_redo_refusals_name_the_segments_not_their_ids(scene, volume, user_node):
    # They said "the segment to merge into ('user') is gone" and "suggestions MedSIGHT_2 are gone": ids the list never
    # shows.
    own_id = add_user_segment(user_node, volume, "Organ", ball((4, 5, 9), 1.5))
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    manager.accept(ids[0], target=user_node, merge_into=own_id)
    assert manager.undo()
    user_node.GetSegmentation().RemoveSegment(own_id)
    with pytest.raises(SuggestionError, match=re.escape("cannot redo merging 'Liver' into 'Organ': that segment was "
                                                        "deleted from 'CT segmentation' since")):
        manager.redo()
    assert manager.suggestion_ids() == ids and segment_ids(user_node) == []
    manager.accept(ids[1], target=user_node)
    assert manager.undo()
    manager.preview_node.GetSegmentation().RemoveSegment(ids[1])  # deleted in the Segment Editor
    with pytest.raises(SuggestionError, match="cannot redo: suggestion 'Spleen' is no longer in the list"):
        manager.redo()
    assert manager.suggestion_ids() == ids[:1] and segment_ids(user_node) == []


def test_redo_of_a_merge_whose_segment_was_replaced_under_its_id_is_refused(scene, volume, user_node):
    # The redo merged into the new segment that got the deleted one's id (ids repeat: "user" here, "MedSIGHT" of an
    # accept, "Segment_1" of older scenes): 'Tumour' took the suggestion's voxels.
    own_id = add_user_segment(user_node, volume, "Organ", ball((4, 5, 9), 1.5))
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    manager.accept(ids, target=user_node, merge_into=own_id)
    assert manager.undo()
    user_node.GetSegmentation().RemoveSegment(own_id)
    assert add_user_segment(user_node, volume, "Tumour", ball((2, 2, 2), 1.5)) == own_id
    before = user_hashes(user_node, volume, [own_id])
    with pytest.raises(SuggestionError, match=re.escape("cannot redo merging 'Liver' into 'Organ': that segment was "
                                                        "deleted from 'CT segmentation' since")):
        manager.redo()
    assert user_hashes(user_node, volume, [own_id]) == before and manager.suggestion_ids() == ids


def test_a_merge_undoes_and_redoes_after_the_segment_editor_brought_its_segment_back(scene, volume, user_node):
    # The Segment Editor's Undo of a delete puts a new segment object under the deleted one's id, with its name,
    # colour, tags and voxels: the merge's undo said "that segment was deleted since" and dropped the step from the
    # history, so the merge could no longer be undone.
    own = ball((4, 5, 9), 1.5)
    own_id = add_user_segment(user_node, volume, "Organ", own)
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    liver = manager.suggestion_mask(ids[0])
    manager.accept(ids, target=user_node, merge_into=own_id)
    delete_and_undo_in_segment_editor(user_node, own_id)
    assert manager.undo()
    np.testing.assert_array_equal(segment_array(user_node, own_id, volume), own)
    assert manager.suggestion_ids() == ids
    delete_and_undo_in_segment_editor(user_node, own_id)
    assert manager.redo()
    np.testing.assert_array_equal(segment_array(user_node, own_id, volume), own | liver)
    assert segment_ids(user_node) == [own_id] and manager.suggestion_ids() == []


def test_undo_and_redo_through_an_accept_and_a_merge_into_it_redo_both(scene, volume, user_node):
    # Accept 'Liver', merge 'Spleen' into it, undo both, redo both: the accept's redo makes the segment again (a new
    # segment object under its first id), and the merge's redo was refused as if the user had deleted 'Liver'.
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    liver, spleen = (manager.suggestion_mask(sid) for sid in ids)
    [accepted] = manager.accept(ids[0], target=user_node)
    assert manager.accept(ids[1], target=user_node, merge_into=accepted) == [accepted]
    assert manager.undo() and manager.undo() and segment_ids(user_node) == []
    assert manager.redo() and manager.redo()
    assert segment_ids(user_node) == [accepted] and manager.suggestion_ids() == []
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), liver | spleen)
    assert manager.undo()  # the redone merge is undone on the segment it went into
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), liver)
    assert manager.suggestion_ids() == ids[1:]


def test_off_grid_answer_is_refused(scene, volume):
    manager = SuggestionManager(scene, volume)
    bad = answer("axial", 4, [("liver", ball())])
    matrix = bad.slice_to_ras.copy()
    matrix[:3, 3] += 0.3
    with pytest.raises(GeometryError):
        manager.add_answer(SliceAnswer("axial", 4, "", bad.regions, matrix))
    assert manager.suggestion_ids() == []


def test_random_sequences_never_change_user_segments(scene, volume, user_node):
    # Two user segments sharing one labelmap layer (as the Segment Editor makes them), overlapping the suggestions.
    ids = [
        add_user_segment(user_node, volume, "Liver", ball((4, 5, 6), 2.0)),
        add_user_segment(user_node, volume, "Lesion", ball((3, 3, 3), 2.0)),
    ]
    user_node.GetSegmentation().CollapseBinaryLabelmaps(False)
    before = user_hashes(user_node, volume, ids)
    rng = np.random.default_rng(7)
    manager = SuggestionManager(scene, volume)
    labels = ["liver", "lesion", "spleen", "kidney"]
    for _step in range(60):
        action = rng.choice(["add", "accept", "accept_all", "reject", "reject_all", "undo", "redo"])
        current = manager.suggestion_ids()
        if action == "add":
            regions = [(str(rng.choice(labels)), ball(tuple(rng.integers(1, 7, 3)), float(rng.uniform(1, 3))))]
            manager.add_answer(answer("axial", int(rng.integers(0, SHAPE[0])), regions))
        elif action in ("accept", "reject") and current:
            getattr(manager, action)(str(rng.choice(current)))
        elif action == "accept_all":
            manager.accept(ALL)
        elif action == "reject_all":
            manager.reject(ALL)
        elif action == "undo":
            manager.undo()
        elif action == "redo":
            manager.redo()
        assert user_hashes(user_node, volume, ids) == before
        names = [user_node.GetSegmentation().GetSegment(s).GetName() for s in ids]
        assert names == ["Liver", "Lesion"]
    while manager.undo():
        pass
    assert user_hashes(user_node, volume, ids) == before
    assert user_node.GetSegmentation().GetNumberOfSegments() == 2  # every accept undone


def test_accept_all_then_undo_restores_everything(scene, volume):
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    masks = [manager.suggestion_mask(s) for s in ids]
    new_ids = manager.accept(ALL)
    assert len(new_ids) == 2 and manager.suggestion_ids() == []
    assert manager.undo()
    assert manager.suggestion_ids() == ids
    for sid, mask in zip(ids, masks, strict=True):
        np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)
    assert manager.user_segmentation_node().GetSegmentation().GetNumberOfSegments() == 0
    assert manager.redo()
    assert manager.user_segmentation_node().GetSegmentation().GetNumberOfSegments() == 2


def segmentation_nodes(scene) -> list:
    return nodes_by_class(scene, "vtkMRMLSegmentationNode")


def test_a_segmentation_removed_after_the_list_looked_for_targets_is_freed(scene, volume):
    """Refreshing the list looks for accept targets (every refresh, every streamed answer); that look must hold on to
    no segmentation, else one the user deletes keeps its voxels in memory until Slicer exits."""
    manager = SuggestionManager(scene, volume)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.CreateDefaultDisplayNodes()
    freed = []
    node.AddObserver(vtk.vtkCommand.DeleteEvent, lambda *_: freed.append(True))
    refreshes = 3
    for _ in range(refreshes):
        assert manager.target_nodes() == [node] and manager.find_user_node() is node
    scene.RemoveNode(node)
    del node
    assert freed == [True]
    assert manager.target_nodes() == []


def test_looking_adds_no_node_and_the_segment_editor_opens_on_the_users_segmentation(scene, volume):
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    assert review.rows() == []
    review.set_visible([], False)
    review.toggle_visible([])
    review.set_show_3d(False)
    assert segmentation_nodes(scene) == []  # selecting a volume or refreshing the list adds nothing

    manager.add_answer(answer("axial", 4, [("liver", ball())]))
    # The Segment Editor, opened with no segmentation chosen, takes the scene's first one: the user's, not the preview.
    first = scene.GetFirstNode(None, "vtkMRMLSegmentationNode")
    assert first is manager.find_user_node() and first is not manager.preview_node


def test_an_accept_with_nothing_to_accept_adds_no_segmentation(scene, volume):
    manager = SuggestionManager(scene, volume)
    assert manager.accept(ALL) == []
    with pytest.raises(SuggestionError, match="no suggestion 'MedSIGHT_7'"):
        manager.accept("MedSIGHT_7")
    assert segmentation_nodes(scene) == []


def test_a_suggestion_erased_to_nothing_is_refused_not_accepted_as_an_empty_segment(scene, volume, user_node):
    # Its accept added an empty segment to the user's segmentation without a word (its merge added nothing).
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    spleen = manager.suggestion_mask(ids[1])
    replace_segment_mask(manager.preview_node, ids[0], np.zeros(SHAPE, dtype=bool), volume)  # the Erase effect
    organ = add_user_segment(user_node, volume, "Organ", ball((2, 5, 6), 1.5))
    before = user_hashes(user_node, volume, [organ])
    for merge_into in (None, organ):
        with pytest.raises(SuggestionError, match=re.escape("nothing left to accept in 'Liver': all its voxels were "
                                                            "erased. Reject it")):
            manager.accept(ALL, target=user_node, merge_into=merge_into)
        assert segment_ids(user_node) == [organ] and user_hashes(user_node, volume, [organ]) == before
        assert manager.suggestion_ids() == ids and not manager.can_undo
    [accepted] = manager.accept(ids[1], target=user_node)  # the one with voxels still goes in, with all of them
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), spleen)
    assert manager.reject(ids[0]) == [ids[0]] and manager.suggestion_ids() == []
    assert manager.undo() and manager.suggestion_ids() == [ids[0]]


def test_a_segment_the_user_drew_in_the_preview_is_never_taken_by_all(scene, volume):
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    drawn = ball((3, 7, 8), 1.5)
    drawn_id = add_user_segment(manager.preview_node, volume, "my drawing", drawn)
    assert manager.suggestion_ids() == ids
    assert manager.reject(ALL) == ids[:1] + ids[1:]
    np.testing.assert_array_equal(segment_array(manager.preview_node, drawn_id, volume), drawn)
    assert manager.undo()
    assert sorted(manager.accept(ALL)) == sorted(segment_ids(manager.find_user_node()))
    assert segment_ids(manager.preview_node) == [drawn_id]
    with pytest.raises(SuggestionError, match="no suggestion"):
        manager.accept(drawn_id)


def test_accepts_and_merges_land_where_shown_when_the_target_sits_under_another_transform(scene, volume, user_node):
    put_under_transform(scene, volume)  # the volume moved; the user's segmentation stayed where it was
    # ... and was made on the volume where it is now (the Segment Editor takes a new segmentation's geometry so): made
    # before, its lattice is turned against the volume's voxels, and accepts are refused (test_accept_saved_lattice).
    user_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    shown = world_points(manager.preview_node, sid)
    np.testing.assert_allclose(shown, mask_world_points(volume, mask), atol=1e-6)

    [accepted] = manager.accept(sid, target=user_node)
    np.testing.assert_allclose(world_points(user_node, accepted), shown, atol=1e-6)
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), mask)
    assert manager.undo() and manager.redo()  # the digests match what was written: nothing looks "edited since"

    [second] = manager.add_answer(answer("axial", 5, [("liver", ball())]))
    more = manager.suggestion_mask(second)
    manager.accept(second, target=user_node, merge_into=accepted)
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), mask | more)
    assert manager.undo()
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), mask)


def test_show_3d_gives_the_users_own_3d_display_back(scene, volume, user_node):
    user_node.CreateDefaultDisplayNodes()
    display = user_node.GetDisplayNode()
    assert display.GetVisibility3D()
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    review.accept(ids[:1])  # Show 3D is off: the user's 3D display is not MedSIGHT's to change
    assert display.GetVisibility3D()
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert not user_node.GetSegmentation().ContainsRepresentation(surface)

    review.set_show_3d(True)
    assert user_node.GetSegmentation().ContainsRepresentation(surface)
    preview_display = manager.preview_node.GetDisplayNode()
    assert preview_display.GetVisibility3D()
    display.SetVisibility3D(False)  # the user hides it while Show 3D is on
    review.accept(ids[1:])
    review.set_show_3d(False)
    assert display.GetVisibility3D()  # as it was before Show 3D, which is what turning it off restores
    assert not user_node.GetSegmentation().ContainsRepresentation(surface)
    assert not preview_display.GetVisibility3D()


def test_a_surface_based_segmentation_is_never_an_accept_target(scene, volume):
    surfaces = slicer.vtkMRMLSegmentationNode()
    surfaces.SetName("CT segmentation")  # the name the default target is looked up by
    scene.AddNode(surfaces)
    surfaces.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    surfaces.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    assert surfaces not in manager.target_nodes()
    with pytest.raises(SuggestionError, match="closed surfaces"):
        manager.accept(sid, target=surfaces)
    assert manager.suggestion_ids() == [sid] and surfaces.GetSegmentation().GetNumberOfSegments() == 0

    [accepted] = manager.accept(sid)  # the default target is a labelmap segmentation of the volume
    user = manager.find_user_node()
    assert user is not surfaces
    np.testing.assert_array_equal(segment_array(user, accepted, volume), mask)
    assert manager.undo() and manager.suggestion_ids() == [sid]


def saved_and_reloaded(scene, volume, preview, folder):
    """``scene`` written as Slicer saves it (scene file, volume, segmentation files) and read back as a new scene."""
    for node, storage, name in ((volume, "vtkMRMLVolumeArchetypeStorageNode", "volume.nrrd"),
                                (preview, "vtkMRMLSegmentationStorageNode", "preview.seg.nrrd")):
        writer = scene.AddNewNodeByClass(storage)
        writer.SetFileName(str(folder / name))
        node.SetAndObserveStorageNodeID(writer.GetID())
        assert writer.WriteData(node)
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(folder / "scene.mrml"))
    assert reloaded.Import()
    return reloaded, reloaded.GetNodeByID(volume.GetID())


def test_suggestions_under_review_and_their_corrections_come_back_with_a_saved_scene(scene, volume, tmp_path):
    from MedSIGHTSlicerLib.suggestions import replace_segment_mask

    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    corrected = manager.suggestion_mask(ids[0]).copy()
    corrected[4, 0:2, 0:3] = True  # what a Segment Editor correction of the preview does
    replace_segment_mask(manager.preview_node, ids[0], corrected, volume)
    spleen = manager.suggestion_mask(ids[1])

    reloaded, volume_again = saved_and_reloaded(scene, volume, manager.preview_node, tmp_path)
    again = SuggestionManager(reloaded, volume_again)
    assert again.suggestion_ids() == ids
    assert [row.name for row in Review(again).rows()] == ["Liver", "Spleen"]
    np.testing.assert_array_equal(again.suggestion_mask(ids[0]), corrected)
    np.testing.assert_array_equal(again.suggestion_mask(ids[1]), spleen)
    [new] = again.add_answer(answer("axial", 3, [("kidney", ball((3, 5, 6), 1.5))]))
    assert new not in ids
    [accepted] = again.accept(ids[0])
    np.testing.assert_array_equal(segment_array(again.find_user_node(), accepted, volume_again), corrected)


@pytest.mark.parametrize("move", ["put under a transform", "transform hardened", "origin edited", "grid edited"])
def test_suggestions_stay_on_the_volumes_voxels_when_the_volume_moves(scene, volume, move):
    if move == "transform hardened":
        put_under_transform(scene, volume)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    if move == "put under a transform":
        put_under_transform(scene, volume)  # the volume's voxels move in the world: the suggestion goes with them
    elif move == "transform hardened":
        volume.HardenTransform()  # the voxels stay where they are in the world: so does the suggestion
    else:  # the Volumes module's origin (one voxel along i) or spacing and directions fields: the voxels move
        grid = ijk_to_ras(volume)
        if move == "origin edited":
            grid[:3, 3] += grid[:3, 0]
        else:  # other spacing, directions turned 30 degrees about S
            c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
            grid[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ grid[:3, :3] @ np.diag([1.3, 0.8, 1.1])
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(grid[r, c]))
        volume.SetIJKToRASMatrix(matrix)
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)
    np.testing.assert_allclose(world_points(manager.preview_node, sid), mask_world_points(volume, mask), atol=1e-6)


def test_forgetting_a_volume_removes_its_saved_preview_never_shown(scene, volume, tmp_path):
    manager = SuggestionManager(scene, volume)
    manager.add_answer(answer("axial", 4, [("liver", ball())]))
    reloaded, volume_again = saved_and_reloaded(scene, volume, manager.preview_node, tmp_path)
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    session = MedSIGHTSession(reloaded)
    session.suggestion_manager(volume_again)  # the list never showed its suggestions
    reloaded.RemoveNode(volume_again)  # the session forgets the volume's manager
    assert [n.GetName() for n in segmentation_nodes(reloaded)] == ["CT segmentation"]


def move_after_accept(scene, volume, user, move: str) -> None:
    """What a user may do between an accept and its undo that moves voxels in the world but edits no segment."""
    if move == "volume origin edited":  # the Volumes module's origin field: one voxel along i
        grid = ijk_to_ras(volume)
        grid[:3, 3] += grid[:3, 0]
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(grid[r, c]))
        volume.SetIJKToRASMatrix(matrix)
    elif move == "volume put under a transform":
        put_under_transform(scene, volume)
    elif move == "volume transform hardened":
        put_under_transform(scene, volume)
        volume.HardenTransform()
    else:  # the segmentation put under a transform
        put_under_transform(scene, user)


MOVES = ["volume origin edited", "volume put under a transform", "volume transform hardened",
         "segmentation put under a transform"]


@pytest.mark.parametrize("move", MOVES)
def test_an_accept_undoes_after_the_volume_or_segmentation_moved(scene, volume, user_node, move):
    # Moving the volume or a transform moves no segment's own voxels: the accepted segment is still exactly what the
    # accept wrote, so its undo takes it out (it was refused as "edited since" and left the history).
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    mask = manager.suggestion_mask(ids[0])
    manager.reject(ids[1])
    [accepted] = manager.accept(ids[0], target=user_node)
    move_after_accept(scene, volume, user_node, move)
    assert manager.undo()
    assert segment_ids(user_node) == []
    np.testing.assert_array_equal(manager.suggestion_mask(ids[0]), mask)  # on the volume's voxels, wherever they are
    assert manager.undo() and manager.suggestion_ids() == ids
    assert manager.redo()
    if move != "volume origin edited":
        # The segmentation's lattice (where Slicer saves it) is turned against the volume's voxels now: redone there,
        # the saved segment would not be the one shown. Refused; the suggestion stays in the list.
        with pytest.raises(SuggestionError, match=r"cannot accept 'Liver' into 'CT segmentation': .*turned against"):
            manager.redo()
        assert segment_ids(user_node) == [] and manager.suggestion_ids() == ids[:1] and manager.can_redo
        return
    assert manager.redo()
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), mask)  # on the voxels as they are now


@pytest.mark.parametrize("move", MOVES)
def test_a_merge_undoes_to_the_segment_as_it_was_after_the_volume_or_segmentation_moved(scene, volume, user_node,
                                                                                       move):
    own = ball((4, 7, 3), 1.6)
    organ = add_user_segment(user_node, volume, "Organ", own)
    before = world_points(user_node, organ)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    suggested = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into=organ)
    assert len(world_points(user_node, organ)) == int((own | suggested).sum())
    move_after_accept(scene, volume, user_node, move)
    assert manager.undo()
    # The user's segment is back on its own voxels (not written again on the moved grid), and nothing else changed.
    from MedSIGHTSlicerLib.views import parent_to_world

    moved_by = parent_to_world(user_node) if move == "segmentation put under a transform" else np.eye(4)
    expected = (moved_by @ np.c_[before, np.ones(len(before))].T)[:3].T
    np.testing.assert_allclose(world_points(user_node, organ), expected[np.lexsort(expected.T[::-1])], atol=1e-6)
    assert segment_ids(user_node) == [organ] and manager.suggestion_ids() == [sid]


def held_voxels(node, segment_id: str) -> int:
    """How many voxels a segment's own labelmap holds (its extent), whatever is set in it."""
    image = node.GetSegmentation().GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    return (i1 - i0 + 1) * (j1 - j0 + 1) * (k1 - k0 + 1)


def test_suggestions_and_accepted_segments_hold_only_the_box_around_their_voxels(scene, volume):
    # Each one held the whole volume before (a byte per voxel: 78 MB per suggestion of a 512 x 512 x 300 CT).
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    masks = [manager.suggestion_mask(sid) for sid in ids]
    boxes = [int(np.prod([a.max() - a.min() + 1 for a in np.nonzero(mask)])) for mask in masks]
    assert all(box < np.prod(SHAPE) for box in boxes)
    assert [held_voxels(manager.preview_node, sid) for sid in ids] == boxes
    accepted = manager.accept(ids)
    user = manager.find_user_node()
    assert [held_voxels(user, sid) for sid in accepted] == boxes
    for sid, mask in zip(accepted, masks):
        np.testing.assert_array_equal(segment_array(user, sid, volume), mask)
    assert manager.undo()
    assert [held_voxels(manager.preview_node, sid) for sid in ids] == boxes
    for sid, mask in zip(ids, masks):
        np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)


def upsampled(mask: np.ndarray) -> np.ndarray:
    """A mask on the volume's voxels as the same voxels on ``oversampled``'s lattice."""
    return np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2)


def test_a_merge_into_a_finer_segment_keeps_its_voxels_and_its_undo_gives_them_back(scene, volume, user_node):
    # The user's segment lies on a lattice twice as fine as the volume's (Segment Editor > Specify geometry,
    # oversampling 2). The merge rewrote it on the volume's voxels (its fine outline gone) and so did the undo.
    fine, fine_shape = oversampled(volume)
    k, j, i = np.indices(fine_shape)
    own = (k - 8.3) ** 2 + (j - 9.7) ** 2 + (i - 5.2) ** 2 <= 3.1**2
    segment = slicer.vtkSegment()
    segment.SetName("Organ")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(own, volume, grid=(fine, fine_shape), crop=True))
    assert user_node.GetSegmentation().AddSegment(segment, "organ")
    before = world_points(user_node, "organ")
    assert len(before) == int(own.sum())

    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 8), 1.5))]))
    suggested = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into="organ")
    after = world_points(user_node, "organ")
    kept = {tuple(p) for p in np.round(before, 6)} <= {tuple(p) for p in np.round(after, 6)}
    assert kept, "voxels of the user's segment were lost in the merge"
    # Each coarse voxel of the suggestion is its 8 fine voxels now.
    merged_on_volume = segment_array(user_node, "organ", volume)
    assert (merged_on_volume & suggested).sum() == suggested.sum()
    assert len(after) == int(own.sum()) + 8 * int(suggested.sum()) - int((own & upsampled(suggested)).sum())
    assert manager.undo()
    np.testing.assert_allclose(world_points(user_node, "organ"), before, atol=1e-6)
    assert manager.redo()
    np.testing.assert_allclose(world_points(user_node, "organ"), after, atol=1e-6)


def test_an_accepted_segment_edited_finer_than_the_volume_is_not_undone(scene, volume, user_node):
    # The Segment Editor (oversampled geometry) redrew the accepted segment on a lattice twice as fine and painted one
    # fine voxel that no volume voxel centre falls in: on the volume's grid it looked unchanged, so undo deleted it.
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [accepted] = manager.accept(sid, target=user_node)
    mask = segment_array(user_node, accepted, volume)
    fine = ijk_to_ras(volume)
    fine[:3, :3] /= 2  # fine voxel 2n is centred on volume voxel n; the odd ones lie between volume voxel centres
    fine_shape = tuple(2 * n for n in SHAPE)
    redrawn = np.zeros(fine_shape, dtype=bool)
    redrawn[::2, ::2, ::2] = mask
    k, j, i = (int(a[0]) for a in np.nonzero(mask))
    redrawn[2 * k, 2 * j, 2 * i - 1] = True  # the stroke: between two volume voxel centres
    replace_segment_mask(user_node, accepted, redrawn, volume, grid=(fine, fine_shape))
    np.testing.assert_array_equal(segment_array(user_node, accepted, volume), mask)  # the volume's grid sees no edit
    with pytest.raises(SuggestionError, match="'Liver': that segment was edited since"):
        manager.undo()
    assert segment_ids(user_node) == [accepted]
    assert len(world_points(user_node, accepted)) == int(redrawn.sum())


def test_an_accept_undoes_after_saving_moved_it_onto_a_finer_segments_lattice(scene, volume, user_node, tmp_path):
    # Slicer's segmentation writer (File > Save; MedSIGHT's export writes a copy) collapses the layers in place: the
    # accepted segment (volume voxels) is resampled onto the lattice of the user's finer segment, 8 fine voxels for
    # each. It is unchanged, so its undo takes it out.
    fine, fine_shape = oversampled(volume)
    k, j, i = np.indices(fine_shape)
    own = (k - 8.3) ** 2 + (j - 3.7) ** 2 + (i - 3.2) ** 2 <= 2.1**2
    segment = slicer.vtkSegment()
    segment.SetName("Organ")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(own, volume, grid=(fine, fine_shape), crop=True))
    assert user_node.GetSegmentation().AddSegment(segment, "organ")
    organ = world_points(user_node, "organ")
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 6, 8), 1.5))]))
    mask = manager.suggestion_mask(sid)
    [accepted] = manager.accept(sid, target=user_node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(user_node)
    assert len(world_points(user_node, accepted)) == 8 * int(mask.sum())  # now on the fine lattice
    assert manager.undo()
    assert segment_ids(user_node) == ["organ"]
    np.testing.assert_allclose(world_points(user_node, "organ"), organ, atol=1e-6)
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)


def correct_finer(manager, segment_id: str, volume) -> np.ndarray:
    """What correcting a suggestion in the Segment Editor after switching the preview to ``oversampled`` geometry
    does: its voxels on the fine lattice, one fine voxel painted beside it and one erased in it. Returns them."""
    fine, fine_shape = oversampled(volume)
    mask = manager.suggestion_mask(segment_id)
    corrected = upsampled(mask)
    k, j, i = (int(a[0]) for a in np.nonzero(mask))  # its first voxel: the one before it along i is not in it
    # Fine voxels 2n are never read onto the volume's voxels (``oversampled``): the volume's voxels see neither.
    corrected[2 * k, 2 * j, 2 * i - 2] = True
    corrected[2 * k, 2 * j, 2 * i] = False
    replace_segment_mask(manager.preview_node, segment_id, corrected, volume, grid=(fine, fine_shape))
    return corrected


def test_a_suggestion_corrected_finer_than_the_volume_is_accepted_with_every_fine_voxel(scene, volume, user_node):
    # The accept copied the suggestion as the volume's voxels showed it: the painted fine voxel was not accepted and
    # the erased one was back.
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    corrected = correct_finer(manager, sid, volume)
    fine = oversampled(volume)
    [accepted] = manager.accept(sid, target=user_node)
    np.testing.assert_array_equal(segment_array(user_node, accepted, None, fine), corrected)
    assert manager.undo()
    assert segment_ids(user_node) == [] and manager.suggestion_ids() == [sid]
    np.testing.assert_array_equal(segment_array(manager.preview_node, sid, None, fine), corrected)
    assert manager.redo()
    np.testing.assert_array_equal(segment_array(user_node, accepted, None, fine), corrected)


def test_a_suggestion_corrected_finer_than_the_volume_is_merged_with_every_fine_voxel(scene, volume, user_node):
    organ = ball((4, 5, 9), 1.5)
    [organ_id] = [add_user_segment(user_node, volume, "Organ", organ)]
    before = world_points(user_node, organ_id)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    corrected = correct_finer(manager, sid, volume)
    fine = oversampled(volume)
    manager.accept(sid, target=user_node, merge_into=organ_id)
    np.testing.assert_array_equal(segment_array(user_node, organ_id, None, fine), upsampled(organ) | corrected)
    assert manager.undo()
    np.testing.assert_allclose(world_points(user_node, organ_id), before, atol=1e-6)


def test_redo_refuses_when_the_suggestion_was_corrected_finer_than_the_volume_after_the_undo(scene, volume):
    # The redo compared the suggestion on the volume's voxels, which did not show the fine correction: the redo
    # accepted the voxels from before it and the correction was lost with the preview segment.
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    mask = manager.suggestion_mask(sid)
    manager.accept(sid)
    assert manager.undo()
    corrected = correct_finer(manager, sid, volume)
    with pytest.raises(SuggestionError, match="cannot redo: suggestion 'Liver' was edited since the undo"):
        manager.redo()
    assert manager.suggestion_ids() == [sid]
    np.testing.assert_array_equal(segment_array(manager.preview_node, sid, None, oversampled(volume)), corrected)
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)  # what the volume's voxels see of it


def test_a_suggestion_corrected_finer_than_the_volume_keeps_its_correction_when_later_slices_grow_it(scene, volume):
    # Growing it rewrote the suggestion on the volume's voxels: the painted fine voxel was gone, the erased one back.
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_streamed_answers([answer("axial", 4, [("liver", ball())])], "ask-1")
    corrected = correct_finer(manager, sid, volume)
    assert manager.add_streamed_answers([answer("axial", 5, [("liver", ball())])], "ask-1") == [sid]
    slice_5 = np.zeros(SHAPE, dtype=bool)
    slice_5[5] = ball()[5]
    fine = oversampled(volume)
    np.testing.assert_array_equal(segment_array(manager.preview_node, sid, None, fine), corrected | upsampled(slice_5))


def test_growing_a_suggestion_on_the_volumes_voxels_reads_the_volumes_whole_grid_once(scene, volume, monkeypatch):
    # Keeping fine corrections made growing check the new voxels through the volume's whole grid as well, besides
    # reading the suggestion there: on a 512 x 512 x 300 CT each streamed slice took about 3.5 s instead of 0.8 s.
    # A suggestion on the volume's own voxels is grown on them, read once, as before.
    import MedSIGHTSlicerLib.suggestions as suggestions

    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_streamed_answers([answer("axial", 4, [("liver", ball())])], "ask-1")
    whole_grid_reads = []

    def counted(name: str, real):
        def spy(*args, **kwargs):
            voxels = real(*args, **kwargs)
            if voxels.shape == SHAPE:
                whole_grid_reads.append(name)
            return voxels
        return spy

    for name in ("segment_array", "mask_on_grid"):
        monkeypatch.setattr(suggestions, name, counted(name, getattr(suggestions, name)))
    assert manager.add_streamed_answers([answer("axial", 5, [("liver", ball())])], "ask-1") == [sid]
    assert whole_grid_reads == ["segment_array"]  # the suggestion as it was, on the volume's voxels
    grown = np.zeros(SHAPE, dtype=bool)
    grown[4:6] = ball()[4:6]
    np.testing.assert_array_equal(manager.suggestion_mask(sid), grown)


def replace_voxels_by_another_size(volume) -> tuple[int, int, int]:
    """What Crop Volume or Resample in place does to the volume's voxel array: one of another size. Returns it."""
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2] - 2, SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = 0
    volume.SetAndObserveImageData(image)
    return (SHAPE[0], SHAPE[1], SHAPE[2] - 2)


def crop_in_place(volume, first: int) -> None:
    """What Crop Volume writing into its input does with an ROI starting at voxel ``first`` along i: fewer voxels, the
    ones kept where they were in the world (the grid's origin moves to voxel ``first``)."""
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2] - first, SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = 0
    grid = ijk_to_ras(volume)
    grid[:3, 3] += grid[:3, 0] * first
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(grid[r, c]))
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(matrix)


def test_a_suggestion_made_before_the_volumes_voxels_were_replaced_is_not_accepted(scene, volume, user_node):
    # The preview follows the volume's grid by voxel index, so the crop's new origin moved the suggestion two voxels
    # (1.34 mm) from what was found, and the accept put it there into the user's segmentation.
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    crop_in_place(volume, 2)
    then, now = (f"{SHAPE[2] - cut}x{SHAPE[1]}x{SHAPE[0]}" for cut in (0, 2))
    with pytest.raises(SuggestionError, match=re.escape(f"cannot accept 'Liver', 'Spleen': the voxels of 'CT' were "
                                                        f"replaced by another grid size since ({then} voxels then, "
                                                        f"{now} now)")):
        manager.accept(ALL, target=user_node)
    assert segment_ids(user_node) == [] and manager.suggestion_ids() == ids
    assert manager.reject(ALL) == ids  # dropping them is still fine
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 4)))]))  # asked again about the new voxels
    assert manager.accept(sid, target=user_node)


def organ_voxels(volume) -> np.ndarray:
    """Give the volume a bright ball (an organ) in darker tissue; returns its (k, j, i) values."""
    from vtk.util import numpy_support

    values = np.where(ball(), 200, 40).astype(np.int16)
    numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars())[:] = values.reshape(-1)
    volume.GetImageData().Modified()
    return values


def test_a_suggestion_is_not_accepted_after_the_volume_was_resampled_in_place_to_the_same_voxel_counts(
        scene, volume, user_node):
    # Only the voxel counts were compared: the volume resampled to half its spacing kept them, the preview followed the
    # grid by index, and the accept put the liver 5.0 mm beside what was found.
    values = organ_voxels(volume)
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    [accepted] = manager.accept(ids[1], target=user_node)
    kept = world_points(user_node, accepted)
    resample_in_place(volume, 0.5)
    size = "x".join(str(n) for n in SHAPE[::-1])
    with pytest.raises(SuggestionError, match=re.escape(f"cannot accept 'Liver': the voxels of 'CT' were replaced "
                                                        f"since (resampled or changed in place: {size} voxels as "
                                                        "then, other values)")):
        manager.accept(ids[0], target=user_node)
    assert segment_ids(user_node) == [accepted] and manager.suggestion_ids() == ids[:1]
    with pytest.raises(SuggestionError, match=r"cannot undo accepting 'Spleen': the voxels of 'CT' were replaced since "
                                              r"\(resampled .*your segments stay as they are"):
        manager.undo()
    assert segment_ids(user_node) == [accepted] and manager.suggestion_ids() == ids[:1]
    np.testing.assert_allclose(world_points(user_node, accepted), kept, atol=1e-6)
    assert manager.reject(ALL) == ids[:1]

    # Moved or re-spaced in the Volumes module, the voxels stay the same: suggestions follow them and are accepted.
    resample_in_place(volume, 2.0)  # back to the first spacing, the organ where it was
    organ_voxels(volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    found = manager.suggestion_mask(sid)
    assert np.all(values[found] == 200)
    grid = ijk_to_ras(volume)
    grid[:3, :3] *= 1.5
    volume.SetIJKToRASMatrix(vtk_matrix(grid))
    [liver] = manager.accept(sid, target=user_node)
    np.testing.assert_array_equal(segment_array(user_node, liver, volume), found)


def test_a_suggestion_reloaded_from_a_saved_scene_is_not_accepted_after_the_volumes_voxels_were_replaced(
        scene, volume, tmp_path):
    # The grid size a suggestion was made on was kept in memory only: reloaded from the scene, it had none, so after
    # the crop it was accepted two voxels beside what was found.
    from MedSIGHTSlicerLib.suggestions import TAG_VOLUME_VOXELS

    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    reloaded, volume_again = saved_and_reloaded(scene, volume, manager.preview_node, tmp_path)
    again = SuggestionManager(reloaded, volume_again)
    assert again.suggestion_ids() == ids
    [spleen] = again.accept(ids[1])  # on the voxels it was made on: accepted, without the review's bookkeeping
    user = again.find_user_node()
    assert get_tag(user.GetSegmentation().GetSegment(spleen), TAG_VOLUME_VOXELS) is None
    crop_in_place(volume_again, 2)
    then, now = (f"{SHAPE[2] - cut}x{SHAPE[1]}x{SHAPE[0]}" for cut in (0, 2))
    with pytest.raises(SuggestionError, match=re.escape(f"cannot accept 'Liver': the voxels of 'CT' were replaced by "
                                                        f"another grid size since ({then} voxels then, {now} now)")):
        again.accept(ids[0])
    assert segment_ids(user) == [spleen] and again.suggestion_ids() == ids[:1]


def test_an_undo_after_the_volumes_voxels_were_replaced_keeps_the_accepted_segment(scene, volume, user_node):
    # The accepted segment was taken out of the user's segmentation, then its suggestion could not be put back on
    # the new grid (a GeometryError): the segment was gone from both, and the next undo said the user deleted it.
    manager = SuggestionManager(scene, volume)
    ids = manager.add_answer(answer("axial", 4, [("liver", ball()), ("spleen", ball((4, 2, 2), 1.2))]))
    manager.reject(ids[1])
    [accepted] = manager.accept(ids[0], target=user_node)
    kept = world_points(user_node, accepted)
    now = replace_voxels_by_another_size(volume)
    size = "x".join(str(n) for n in now[::-1])
    with pytest.raises(SuggestionError, match=rf"accepting 'Liver': the voxels of 'CT' were replaced .*, {size} now\)"
                                              r".*your segments stay as they are\. Undo again"):
        manager.undo()
    assert segment_ids(user_node) == [accepted]
    np.testing.assert_allclose(world_points(user_node, accepted), kept, atol=1e-6)
    with pytest.raises(SuggestionError, match="rejecting 'Spleen': the voxels of 'CT' were replaced"):
        manager.undo()
    assert not manager.can_undo and manager.suggestion_ids() == [] and segment_ids(user_node) == [accepted]


def test_a_redo_after_the_volumes_voxels_were_replaced_says_so(scene, volume):
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    manager.accept(sid)
    assert manager.undo()
    replace_voxels_by_another_size(volume)
    with pytest.raises(SuggestionError, match="cannot redo accepting 'Liver': the voxels of 'CT' were replaced"):
        manager.redo()


def lattice_of(volume, kind: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A segment lattice over the volume that is not its voxels: 3x coarser, or as fine but turned 40 degrees."""
    matrix = ijk_to_ras(volume)
    if kind == "coarser":
        matrix[:3, 3] += matrix[:3, :3] @ np.ones(3)  # coarse voxel n is centred on volume voxel 3n + 1
        matrix[:3, :3] *= 3
        return matrix, tuple(n // 3 for n in SHAPE)
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    turn = np.eye(4)
    turn[:2, :2] = [[c, -s], [s, c]]  # about the volume's k axis, through its voxel 0
    return matrix @ turn, SHAPE


@pytest.mark.parametrize("kind", ["coarser", "rotated"])
def test_a_merge_into_a_coarser_or_rotated_segment_keeps_every_suggested_voxel(scene, volume, user_node, kind):
    # The suggestion was put on the segment's lattice by nearest neighbour: a suggested voxel holding no lattice voxel
    # centre was dropped, and the accept succeeded with none of a small suggestion merged.
    lattice, lattice_shape = lattice_of(volume, kind)
    own = np.zeros(lattice_shape, dtype=bool)
    own[0, 1, 1] = True
    segment = slicer.vtkSegment()
    segment.SetName("Organ")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(own, volume, grid=(lattice, lattice_shape), crop=True))
    assert user_node.GetSegmentation().AddSegment(segment, "organ")
    before = world_points(user_node, "organ")
    organ_on_volume = segment_array(user_node, "organ", volume)
    assert organ_on_volume.any()

    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 6), 1.0))]))
    suggested = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into="organ")
    merged = segment_array(user_node, "organ", volume)
    assert int((merged & suggested).sum()) == int(suggested.sum())
    assert int((merged & organ_on_volume).sum()) == int(organ_on_volume.sum())
    after = world_points(user_node, "organ")
    assert manager.undo()
    np.testing.assert_allclose(world_points(user_node, "organ"), before, atol=1e-6)  # its own voxels, exactly
    assert manager.suggestion_ids() == [sid]
    assert manager.redo()
    np.testing.assert_allclose(world_points(user_node, "organ"), after, atol=1e-6)


def test_a_merge_on_the_volumes_voxels_resamples_only_the_suggestion_in(scene, volume, user_node, monkeypatch):
    # The check that no voxel is lost sent every part back through the merged grid, and the suggestion was compared
    # with itself on its own box: a merge into a large liver in a shared layer of a 512 x 512 x 300 CT took 7.9 s
    # instead of 4.7 s, an accept 1.8 s instead of 1.0 s. Parts on the volume's or the merged grid's own lattice go
    # there and back exactly, so only what lies off it is resampled to check.
    import MedSIGHTSlicerLib.suggestions as suggestions

    own = ball((4, 5, 6), 2.0)
    segment = slicer.vtkSegment()
    segment.SetName("Organ")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(own, volume, crop=True))
    assert user_node.GetSegmentation().AddSegment(segment, "organ")
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 7, 6), 1.0))]))
    suggested = manager.suggestion_mask(sid)
    resampled = []
    real = suggestions.mask_on_grid
    monkeypatch.setattr(suggestions, "mask_on_grid", lambda *args: resampled.append(1) or real(*args))
    manager.accept(sid, target=user_node, merge_into="organ")
    assert len(resampled) == 1  # the suggestion, onto the merged grid
    np.testing.assert_array_equal(segment_array(user_node, "organ", volume), own | suggested)
    assert manager.undo()
    np.testing.assert_array_equal(segment_array(user_node, "organ", volume), own)


def add_segment_on(node, volume, name: str, own: np.ndarray, lattice: np.ndarray) -> str:
    """A user segment ``own`` on its own ``lattice`` (own.shape voxels), as the Segment Editor keeps one."""
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(own, volume, grid=(lattice, own.shape), crop=True))
    segment_id = name.lower()
    assert node.GetSegmentation().AddSegment(segment, segment_id)
    return segment_id


def test_a_merge_into_a_coarser_segment_keeps_its_voxels_outside_the_volumes_box(scene, volume, user_node):
    # The fallback merge (a suggested voxel holds no coarse voxel centre) wrote the segment back on the volume's
    # voxels only: its coarse voxel beside the volume was gone after the merge (its undo gave it back).
    lattice, lattice_shape = lattice_of(volume, "coarser")
    lattice[:3, 3] -= lattice[:3, :3] @ np.array([2.0, 0.0, 0.0])  # coarse voxels 0 and 1 lie before volume voxel 0
    own = np.zeros(lattice_shape, dtype=bool)
    own[1, 1, [0, 2]] = True  # one coarse voxel beside the volume, one in it
    organ = add_segment_on(user_node, volume, "Organ", own, lattice)
    before = world_points(user_node, organ)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 6), 1.0))]))
    suggested = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into=organ)
    on_lattice = segment_array(user_node, organ, None, (lattice, lattice_shape))
    assert int((on_lattice & own).sum()) == int(own.sum())  # every coarse voxel centre is still in the segment
    assert int((segment_array(user_node, organ, volume) & suggested).sum()) == int(suggested.sum())
    after = world_points(user_node, organ)
    assert manager.undo()
    np.testing.assert_allclose(world_points(user_node, organ), before, atol=1e-6)
    assert manager.redo()
    np.testing.assert_allclose(world_points(user_node, organ), after, atol=1e-6)


def test_a_merge_that_would_drop_voxels_of_a_rotated_segment_is_refused(scene, volume, user_node):
    # Voxels of a turned lattice that hold no volume voxel centre were dropped by the fallback merge, unseen.
    lattice, lattice_shape = lattice_of(volume, "rotated")
    own = np.zeros(lattice_shape, dtype=bool)
    own[1, 2:5, 2:6] = True
    organ = add_segment_on(user_node, volume, "Organ", own, lattice)
    before = world_points(user_node, organ)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 6), 1.0))]))
    suggested = manager.suggestion_mask(sid)
    with pytest.raises(SuggestionError, match=rf"cannot merge into 'Organ': .* would lose \d+ of its {own.sum()} "
                                              "voxels. Accept the suggestion as a new segment instead"):
        manager.accept(sid, target=user_node, merge_into=organ)
    np.testing.assert_allclose(world_points(user_node, organ), before, atol=1e-6)
    assert manager.suggestion_ids() == [sid] and not manager.can_undo
    np.testing.assert_array_equal(manager.suggestion_mask(sid), suggested)


def test_a_merge_on_the_volumes_voxels_leaves_a_turned_neighbour_in_its_layer_as_it_was(scene, volume, user_node):
    # "Organ" and "Other" share one labelmap layer on a turned lattice. The merge into Organ fell back to the volume's
    # voxels, and Slicer moved the whole shared layer onto them: Other, never named, lost 1 of its 8 voxels.
    from vtk.util import numpy_support

    lattice, lattice_shape = lattice_of(volume, "rotated")
    labels = np.zeros(lattice_shape, dtype=np.uint8)
    labels[4, 2:5, 6:9] = 1
    labels[4, 6:8, 2:6] = 2
    layer = labelmap_from_array(labels > 0, volume, grid=(lattice, lattice_shape))
    numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())[:] = labels.reshape(-1)
    layer.Modified()
    for value, name in ((1, "Organ"), (2, "Other")):
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetLabelValue(value)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), layer)
        assert user_node.GetSegmentation().AddSegment(segment, name.lower())
    other = world_points(user_node, "other")
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball((4, 5, 6), 1.0))]))
    suggested = manager.suggestion_mask(sid)
    manager.accept(sid, target=user_node, merge_into="organ")
    np.testing.assert_allclose(world_points(user_node, "other"), other, atol=1e-6)
    assert int((segment_array(user_node, "organ", volume) & suggested).sum()) == int(suggested.sum())
    assert int((segment_array(user_node, "organ", None, (lattice, lattice_shape)) & (labels == 1)).sum()) == int(
        (labels == 1).sum())
    assert manager.undo()
    np.testing.assert_allclose(world_points(user_node, "other"), other, atol=1e-6)


def test_an_undo_or_redo_after_the_volume_lost_its_image_data_names_it(scene, volume, user_node):
    # An AttributeError ('NoneType' object has no attribute 'GetDimensions') before: a raw traceback in Slicer.
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(answer("axial", 4, [("liver", ball())]))
    [accepted] = manager.accept(sid, target=user_node)
    kept = world_points(user_node, accepted)
    image = volume.GetImageData()  # kept alive to put back
    volume.SetAndObserveImageData(None)
    with pytest.raises(GeometryError, match="volume 'CT' has no image data"):
        manager.undo()
    assert segment_ids(user_node) == [accepted] and manager.suggestion_ids() == []
    np.testing.assert_allclose(world_points(user_node, accepted), kept, atol=1e-6)
    volume.SetAndObserveImageData(image)
    assert manager.undo() and manager.suggestion_ids() == [sid]
    volume.SetAndObserveImageData(None)
    with pytest.raises(GeometryError, match="volume 'CT' has no image data"):
        manager.redo()
    assert manager.suggestion_ids() == [sid] and segment_ids(user_node) == []


def test_voxel_set_digest_grows_voxel_by_voxel_to_the_whole_masks_digest():
    whole = ball()
    voxels = np.argwhere(whole)
    half = np.zeros(SHAPE, dtype=bool)
    half[tuple(voxels[: len(voxels) // 2].T)] = True
    grown = voxel_set_digest(None, SHAPE, voxels[len(voxels) // 2 :], voxel_set_digest(half))
    assert grown == voxel_set_digest(whole)
    assert voxel_set_digest(None, SHAPE, voxels[:0], grown) == grown  # nothing added: the same digest
    one_less = whole.copy()
    one_less[tuple(voxels[0])] = False
    assert voxel_set_digest(one_less) != grown
    moved = np.roll(whole, 1, axis=2)  # as many voxels, elsewhere
    assert voxel_set_digest(moved) != grown


def test_a_streamed_finding_grows_slice_by_slice_to_the_whole_answers_voxels_keeping_a_users_edit(scene, volume):
    """Streamed slice by slice (each growth writes only that slice's slab), a finding ends with the voxels the whole
    answer makes at once, plus what the user painted into it between two slices."""
    liver = ball(radius=3.4)
    slices = [k for k in range(SHAPE[0]) if liver[k].any()]
    at_once = SuggestionManager(scene, volume)
    (whole,) = at_once.add_answers([answer("axial", k, [("liver", liver)]) for k in slices])
    streamed = SuggestionManager(scene, volume)
    (sid,) = streamed.add_streamed_answers([answer("axial", slices[0], [("liver", liver)])], "ask")
    stroke = np.zeros(SHAPE, dtype=bool)
    stroke[slices[-1], 0, :3] = True  # painted in the Segment Editor, on a slice still to come, outside the liver
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(labelmap_from_array(stroke, volume), streamed.preview_node, sid,
                                            logic.MODE_MERGE_MAX)
    for k in slices[1:]:
        assert streamed.add_streamed_answers([answer("axial", k, [("liver", liver)])], "ask") == [sid]
    expected = at_once.suggestion_mask(whole) | stroke
    assert stroke.sum() > 0 and not (at_once.suggestion_mask(whole) & stroke).any()
    np.testing.assert_array_equal(streamed.suggestion_mask(sid), expected)


def test_answers_that_arrive_together_grow_each_finding_once_to_what_one_by_one_makes(scene, volume):
    """A request's slices end together: taken together, each finding of a running ask grows once (one slab write
    and one shrink by Slicer for all of them, about half the time at 512 x 512), and ends with the voxels, slices,
    codes and confidence that taking them one by one gives; a new finding among them is made from all its slices."""
    liver, kidney = ball(radius=3.4), ball(centre=(5, 4, 2), radius=1.6)
    slices = [k for k in range(SHAPE[0]) if liver[k].any()]
    answers = [answer("axial", k, [("liver", liver), ("kidney", kidney)], prob=0.5 + 0.05 * k) for k in slices]
    one_by_one, together = SuggestionManager(scene, volume), SuggestionManager(scene, volume)
    for a in answers:
        one_by_one.add_streamed_answers([a], "ask")  # one slice a request
    expected_ids = one_by_one.suggestion_ids()  # the two managers share the volume's preview node
    grown = []
    grow = together._grow_suggestion
    together._grow_suggestion = lambda sid, group, voxels: (grown.append(sid), grow(sid, group, voxels))
    first = together.add_streamed_answers(answers[:1], "ask")  # the first request: one slice
    assert together.add_streamed_answers(answers[1:], "ask")[: len(first)] == first
    kidney_slices = [k for k in slices[1:] if kidney[k].any()]
    assert kidney_slices and not kidney[slices[0]].any()  # the kidney is new in the second request
    assert grown == first  # the liver grew once for all the second request's slices; the kidney was made at once
    tags = (TAG_SLICE, TAG_REGION_CODE, TAG_CONFIDENCE)
    got_ids = [sid for sid in together.suggestion_ids() if sid not in expected_ids]
    assert len(got_ids) == len(expected_ids) == 2
    for expected, got in zip(expected_ids, got_ids):
        np.testing.assert_array_equal(together.suggestion_mask(got), one_by_one.suggestion_mask(expected))
        assert [get_tag(together.suggestion(got), t) for t in tags] == [
            get_tag(one_by_one.suggestion(expected), t) for t in tags]


@pytest.mark.parametrize("edit", ["between_growths", "after_the_last"])
def test_redo_after_growth_tells_growth_from_an_edit_made_between_growths(scene, volume, edit):
    """The digest of a grown suggestion is kept slab by slab: a user's edit between two growths is part of what the
    question grew (redo says it grew), one after the last growth is an edit (redo says so), as when it was rehashed
    whole each slice."""
    liver = ball()  # clear of the faces, where the lattice box of a growth sticks out and it is rewritten whole
    slices = [k for k in range(SHAPE[0]) if liver[k].any()]
    manager = SuggestionManager(scene, volume)
    (sid,) = manager.add_streamed_answers([answer("axial", slices[0], [("liver", liver)])], "ask")
    manager.reject([sid])
    manager.undo()
    stroke = np.zeros(SHAPE, dtype=bool)
    stroke[slices[-1], 1, 1:4] = True  # off the liver and off the volume's faces too
    assert not (stroke & liver).any()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for n, k in enumerate(slices[1:]):
        if edit == "between_growths" and n == 1:
            assert logic.SetBinaryLabelmapToSegment(labelmap_from_array(stroke, volume), manager.preview_node, sid,
                                                    logic.MODE_MERGE_MAX)
        manager.add_streamed_answers([answer("axial", k, [("liver", liver)])], "ask")
    if edit == "after_the_last":
        assert logic.SetBinaryLabelmapToSegment(labelmap_from_array(stroke, volume), manager.preview_node, sid,
                                                logic.MODE_MERGE_MAX)
    why = "grew with later slices" if edit == "between_growths" else "was edited"
    with pytest.raises(SuggestionError, match=why):
        manager.redo()
    assert manager.suggestion_mask(sid)[stroke].all()
