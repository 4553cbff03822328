"""Annotator review over slicer-core's MRML and a live tiny-model engine: reject, correct, accept, undo, redo, merge.

After every step the user segmentation's labelmap must equal the expected array, and a segment the user had
before must be unchanged unless a merge named it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer

from medsight_testing.mrml import oblique_matrix
from medsight_testing.review_scene import (
    add_shared_user_segments,
    check_segments,
    ct_scene,
    delete_and_undo_in_segment_editor,
    organ_masks,
    paint,
    slab_answer,
    user_segmentation,
)
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.geometry import segment_array, volume_upload_arrays
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer
from MedSIGHTSlicerLib.review import Review, describe_slices, take_answers
from MedSIGHTSlicerLib.suggestions import TAG_SLICE, SuggestionError, SuggestionManager, get_tag, replace_segment_mask

OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
SLICES = (2, 3, 4)


def test_reject_correct_accept_undo_redo_merge_with_live_engine(url):
    scene, volume, voxels = ct_scene()
    shape = voxels.shape

    # The user's own work: two segments sharing one labelmap layer, before any suggestion exists.
    user = user_segmentation(scene, volume)
    liver, kidney = organ_masks(shape)
    liver_id, kidney_id = add_shared_user_segments(user, volume, {"Liver": liver, "Kidney": kidney})
    expected = {liver_id: liver.copy(), kidney_id: kidney.copy()}
    check_segments(user, volume, expected)

    # Ask about 3 slices: each slice's regions become suggestions as its answer arrives.
    client = MedSIGHTClient(url, timeout=60, retries=0)
    array, spacing, origin, direction = volume_upload_arrays(volume)
    info = client.upload_volume(array, spacing, origin, direction, modality="CT")
    manager = SuggestionManager(scene, volume, model="tiny")
    review = Review(manager)
    for index in SLICES:
        result = client.ask(info.volume_id, "Where is the liver?", indices=[index], options=OPTIONS)
        for answer in result.answers:
            manager.add_answer(answer, question="Where is the liver?", model=result.model)
    ids = manager.suggestion_ids()
    assert len(ids) >= 3, f"the tiny engine gave {len(ids)} non-empty regions on slices {SLICES}"
    rows = review.rows()
    assert [r.segment_id for r in rows] == ids
    assert all(r.question == "Where is the liver?" and r.slices.startswith("axial ") for r in rows)
    assert all(r.confidence is not None and 0.0 <= r.confidence <= 1.0 for r in rows)
    check_segments(user, volume, expected)  # suggestions live in the preview only
    rejected, corrected, merged = ids[0], ids[1], ids[2]
    merged_mask = manager.suggestion_mask(merged)

    # Reject one suggestion.
    review.reject([rejected])
    assert rejected not in manager.suggestion_ids()
    check_segments(user, volume, expected)

    # Correct another in its preview segment (as the Segment Editor's paint effect would), then accept it.
    stroke = np.zeros(shape, dtype=bool)
    stroke[5:7, 10:13, 2:5] = True
    paint(manager.preview_node, corrected, stroke, volume)
    painted = manager.suggestion_mask(corrected)
    assert painted.sum() > stroke.sum() and painted[stroke].all()
    (accepted_id,) = review.accept([corrected])
    assert accepted_id not in (liver_id, kidney_id)
    expected[accepted_id] = painted
    check_segments(user, volume, expected)

    # Undo puts the corrected suggestion back (with the correction); redo accepts it again.
    assert review.undo()
    del expected[accepted_id]
    check_segments(user, volume, expected)
    assert corrected in manager.suggestion_ids()
    assert np.array_equal(manager.suggestion_mask(corrected), painted)
    assert review.redo()
    expected[accepted_id] = painted
    check_segments(user, volume, expected)

    # Merge a third into the user's liver; extend it into the kidney's voxels first, so a merge that wrote into
    # the shared layer would take voxels from the kidney.
    paint(manager.preview_node, merged, kidney, volume)
    grown = merged_mask | kidney
    assert np.array_equal(manager.suggestion_mask(merged), grown)
    review.set_target(user, merge_into=liver_id)
    assert review.accept([merged]) == [liver_id]
    expected[liver_id] = liver | grown
    check_segments(user, volume, expected)  # the kidney, not named by the merge, is unchanged
    assert user.GetSegmentation().GetSegment(liver_id).GetName() == "Liver"

    # Undo and redo the merge.
    assert review.undo()
    expected[liver_id] = liver.copy()
    check_segments(user, volume, expected)
    assert merged in manager.suggestion_ids()
    assert review.redo()
    expected[liver_id] = liver | grown
    check_segments(user, volume, expected)

    # Back to the start, one undo at a time: the user's own segments are exactly what they were.
    while review.undo():
        pass
    check_segments(user, volume, {liver_id: liver, kidney_id: kidney})
    assert sorted(manager.suggestion_ids()) == sorted(ids)


def test_merge_and_target_are_checked(url):
    scene, volume, voxels = ct_scene()
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    other = slicer.vtkMRMLSegmentationNode()
    other.SetName("Second opinion")
    scene.AddNode(other)
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(voxels.shape, dtype=bool)
    mask[2:4, 5:9, 5:9] = True
    # An answer whose one region is slice 2 of ``mask`` (the array's axial slab, pixel (col, row) = (i, j)).
    slice_to_ras = oblique_matrix() @ np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]])
    region = Region("[M1_1]", "lesion", 0, mask[2], 0.8, None)
    (sid,) = manager.add_answer(SliceAnswer("axial", 2, "A lesion.", [region], slice_to_ras), question="Lesion?")
    assert np.array_equal(manager.suggestion_mask(sid)[2], mask[2])

    with pytest.raises(SuggestionError, match="no segment 'nope'"):
        review.set_target(other, merge_into="nope")
    with pytest.raises(SuggestionError, match="preview"):
        manager.accept([sid], target=manager.preview_node)
    # Accept into a chosen segmentation that is not the module's own.
    assert review.targets() == [other]
    review.set_target(other)
    (new_id,) = review.accept([sid])
    only_slice_2 = np.zeros_like(mask)
    only_slice_2[2] = mask[2]
    assert np.array_equal(segment_array(other, new_id, volume), only_slice_2)
    assert manager.find_user_node() is other  # the only segmentation of this volume


def test_a_merge_into_a_removed_segmentation_is_refused_not_redirected():
    scene, volume, voxels = ct_scene()
    shape = voxels.shape
    liver, kidney = organ_masks(shape)
    own = user_segmentation(scene, volume)
    (own_id,) = add_shared_user_segments(own, volume, {"Liver": liver})
    other = user_segmentation(scene, volume, name="Second opinion")
    (other_id,) = add_shared_user_segments(other, volume, {"Kidney": kidney})
    assert own_id == other_id  # segment ids repeat across segmentations
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    slice_to_ras = oblique_matrix() @ np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]])
    lesion = np.zeros(shape[1:], dtype=bool)
    lesion[20:24, 4:8] = True
    (sid,) = manager.add_answer(SliceAnswer("axial", 2, "A lesion.", [Region("[M1_1]", "lesion", 0, lesion, 0.8, None)],
                                            slice_to_ras))
    review.set_target(other, merge_into=other_id)
    scene.RemoveNode(other)  # the chosen segmentation goes (Data module) before the accept
    with pytest.raises(SuggestionError, match="Second opinion"):
        review.accept([sid])
    check_segments(own, volume, {own_id: liver})  # the same-id segment of the user's own was not merged into
    assert manager.suggestion_ids() == [sid]
    assert (review.target, review.merge_into) == (None, "")  # the next accept goes to new segments of the own
    (new_id,) = review.accept([sid])
    expected = np.zeros(shape, dtype=bool)
    expected[2] = lesion
    check_segments(own, volume, {own_id: liver, new_id: expected})

    # The same with the default target (the user's own, as the list starts): a merge into its segment is refused
    # once it is removed, not redirected to the segmentation that is the user's own after it.
    review.undo()
    other = user_segmentation(scene, volume, name="Second opinion")
    (other_id,) = add_shared_user_segments(other, volume, {"Kidney": kidney})
    assert manager.find_user_node() is own and other_id == own_id
    review.set_target(None, merge_into=own_id)
    scene.RemoveNode(own)
    with pytest.raises(SuggestionError, match="CT segmentation"):
        review.accept([sid])
    check_segments(other, volume, {other_id: kidney})


def test_an_accept_into_a_removed_segmentation_is_refused_not_redirected():
    # The chosen segmentation was removed (Data module) before Accept: the suggestion went into the user's own
    # segmentation without a word, and the list said "Accepted 1 suggestion as new segments."
    scene, volume, voxels = ct_scene()
    liver, _ = organ_masks(voxels.shape)
    own = user_segmentation(scene, volume)
    (own_id,) = add_shared_user_segments(own, volume, {"Liver": liver})
    other = user_segmentation(scene, volume, name="Second opinion")
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    [sid] = manager.add_answer(slab_answer(volume, 2, rows=slice(20, 24), cols=slice(4, 8)))
    suggested = manager.suggestion_mask(sid)
    review.set_target(other)
    scene.RemoveNode(other)
    with pytest.raises(SuggestionError, match=r"the segmentation to accept into \('Second opinion'\) was removed: "
                                              "choose where to accept again"):
        review.accept([sid])
    check_segments(own, volume, {own_id: liver})
    assert manager.suggestion_ids() == [sid] and review.target is None  # the next accept goes to the own
    (new_id,) = review.accept([sid])
    check_segments(own, volume, {own_id: liver, new_id: suggested})


def _a_merge_chosen_into_liver(*names: str) -> SimpleNamespace:
    """The CT scene with the user's segments of ``names`` (Liver first; their organ masks in ``masks``) in ``own``
    (ids in ``ids``), one suggestion ``sid`` on slab 2 (its mask ``suggested``) and a merge into Liver chosen."""
    scene, volume, voxels = ct_scene()
    masks = dict(zip(("Liver", "Kidney"), organ_masks(voxels.shape)))
    own = user_segmentation(scene, volume)
    ids = add_shared_user_segments(own, volume, {name: masks[name] for name in names})
    manager = SuggestionManager(scene, volume)
    review = Review(manager)
    [sid] = manager.add_answer(slab_answer(volume, 2, rows=slice(20, 24), cols=slice(4, 8)))
    review.set_target(own, merge_into=ids[0])
    return SimpleNamespace(own=own, volume=volume, voxels=voxels, manager=manager, review=review, sid=sid,
                           suggested=manager.suggestion_mask(sid), ids=ids, masks=masks)


def test_a_merge_into_a_segment_deleted_since_it_was_chosen_names_it():
    # It said "no segment 'user' in 'CT segmentation' to merge into" (an id the list never shows), and kept the merge
    # choice, so Accept kept failing the same way.
    m = _a_merge_chosen_into_liver("Liver", "Kidney")
    own, volume, manager, review, sid, suggested = m.own, m.volume, m.manager, m.review, m.sid, m.suggested
    (liver_id, kidney_id), kidney = m.ids, m.masks["Kidney"]
    own.GetSegmentation().RemoveSegment(liver_id)  # deleted in the Segment Editor
    with pytest.raises(SuggestionError, match=r"the segment to merge into \('Liver'\) was deleted: choose where to "
                                              "accept again"):
        review.accept([sid])
    check_segments(own, volume, {kidney_id: kidney})
    assert manager.suggestion_ids() == [sid] and review.merge_into == ""
    (new_id,) = review.accept([sid])  # new segments, as the list now shows
    check_segments(own, volume, {kidney_id: kidney, new_id: suggested})


def test_a_merge_choice_follows_its_segment_not_its_id():
    # The choice was kept by segment id: a new segment given the deleted one's id ("user" here; "MedSIGHT" of an
    # accept, "Segment_1" of older scenes) took the merge, without a word.
    m = _a_merge_chosen_into_liver("Liver")
    own, volume, manager, review, sid, suggested = m.own, m.volume, m.manager, m.review, m.sid, m.suggested
    voxels = m.voxels
    (liver_id,), kidney = m.ids, m.masks["Kidney"]
    own.GetSegmentation().RemoveSegment(liver_id)
    (tumour_id,) = add_shared_user_segments(own, volume, {"Tumour": kidney})
    assert tumour_id == liver_id
    with pytest.raises(SuggestionError, match=r"the segment to merge into \('Liver'\) was deleted: choose where to "
                                              "accept again"):
        review.accept([sid])
    check_segments(own, volume, {tumour_id: kidney})
    assert manager.suggestion_ids() == [sid] and review.merge_into == ""
    (new_id,) = review.accept([sid])
    check_segments(own, volume, {tumour_id: kidney, new_id: suggested})

    # A merge chosen into the segment that holds the id now goes there; and a paint stroke (the Segment Editor's
    # edits keep the segment) leaves the choice as it was.
    review.undo()
    review.set_target(own, merge_into=tumour_id)
    stroke = np.zeros(voxels.shape, dtype=bool)
    stroke[5, 2:4, 2:4] = True
    paint(own, tumour_id, stroke, volume)
    assert not review.merge_segment_gone()
    assert review.accept([sid]) == [tumour_id]
    check_segments(own, volume, {tumour_id: kidney | stroke | suggested})


def test_a_merge_choice_follows_its_segment_back_after_the_segment_editors_undo():
    # Deleted by mistake and brought back with the Segment Editor's Undo (a new segment object under its id, with its
    # name, colour, tags and voxels), the chosen segment counted as gone: Accept refused the merge and the list fell
    # back to New segments.
    m = _a_merge_chosen_into_liver("Liver", "Kidney")
    own, volume, review, sid, suggested = m.own, m.volume, m.review, m.sid, m.suggested
    (liver_id, kidney_id), liver, kidney = m.ids, m.masks["Liver"], m.masks["Kidney"]
    own.GetSegmentation().GetSegment(liver_id).SetName("Liver (checked)")  # renamed after the choice: still it
    delete_and_undo_in_segment_editor(own, liver_id)
    assert not review.merge_segment_gone()
    assert review.accept([sid]) == [liver_id]
    check_segments(own, volume, {liver_id: liver | suggested, kidney_id: kidney})


def test_streamed_answers_grow_one_suggestion_per_finding(url):
    scene, volume, voxels = ct_scene()
    client = MedSIGHTClient(url, timeout=60, retries=0)
    array, spacing, origin, direction = volume_upload_arrays(volume)
    info = client.upload_volume(array, spacing, origin, direction, modality="CT")
    result = client.ask(info.volume_id, "Where is the liver?", indices=list(range(voxels.shape[0])), options=OPTIONS)

    streamed = SuggestionManager(scene, volume)
    seen = []
    for answer in result.answers:
        streamed.add_streamed_answers([answer], "ask-1", question="Where is the liver?")
        seen.append(len(streamed.suggestion_ids()))
    at_end = SuggestionManager(scene, volume)
    at_end.add_answers([a for a in result.answers if a.regions], question="Where is the liver?")
    # Streaming ends where the one-shot grouping does: the same findings with the same voxels.
    assert seen[0] >= 1
    streamed_masks = sorted(streamed.suggestion_mask(s).tobytes() for s in streamed.suggestion_ids())
    final_masks = sorted(at_end.suggestion_mask(s).tobytes() for s in at_end.suggestion_ids())
    assert streamed_masks == final_masks


def test_describe_slices():
    assert describe_slices("axial:3;axial:4;axial:5;axial:9") == "axial 3–5, 9"
    assert describe_slices("coronal:7") == "coronal 7"
    assert describe_slices("") == ""


def test_a_finding_reviewed_mid_stream_is_not_grown_again():
    scene, volume, _ = ct_scene()
    manager = SuggestionManager(scene, volume)
    liver = functools.partial(slab_answer, volume, rows=slice(10, 20), cols=slice(12, 26))  # one axial slice's answer
    disc = liver(1).regions[0].mask

    (first,) = take_answers(manager, [liver(1)], ask_serial=7, scope="range", question="Liver?")
    assert take_answers(manager, [liver(2)], ask_serial=7, scope="range") == [first]  # grows the same finding
    assert manager.suggestion_mask(first)[1:3].sum() == 2 * disc.sum()
    assert get_tag(manager.suggestion(first), TAG_SLICE) == "axial:1;axial:2"
    manager.reject([first])
    (second,) = take_answers(manager, [liver(3)], ask_serial=7, scope="range")
    assert second != first and manager.suggestion_mask(second).sum() == disc.sum()  # a new one, slice 3 only
    manager.undo()  # the rejected finding comes back as it was when rejected
    assert manager.suggestion_mask(first)[1:3].sum() == 2 * disc.sum() and not manager.suggestion_mask(first)[3].any()
    # A one-slice ask keeps each region its own suggestion (two "liver" regions stay two).
    two = SliceAnswer("axial", 4, "Two.", [Region("[M0_2]", "liver", 0, disc, 0.9, None),
                                            Region("[M0_3]", "liver", 1, disc, 0.8, None)], liver(4).slice_to_ras)
    assert len(take_answers(manager, [two], ask_serial=8, scope="current")) == 2


@pytest.mark.parametrize("action", ["reject", "accept"])
def test_redo_after_later_slices_grew_the_suggestion_says_so(action):
    """Reject (or accept) a streamed finding, undo it, and the running question's next slice grows it: redoing would
    act on the voxels it had before, so it is refused, saying it grew with later slices (not that it was edited)."""
    scene, volume, _ = ct_scene()
    manager = SuggestionManager(scene, volume)
    liver = functools.partial(slab_answer, volume, rows=slice(10, 20), cols=slice(12, 26))  # one axial slice's answer
    disc = liver(1).regions[0].mask

    (first,) = take_answers(manager, [liver(1)], ask_serial=7, scope="range", question="Liver?")
    getattr(manager, action)([first])
    manager.undo()
    assert take_answers(manager, [liver(2)], ask_serial=7, scope="range") == [first]  # grows the restored one
    with pytest.raises(SuggestionError, match="grew with later slices of the running question since the undo"):
        manager.redo()
    assert manager.suggestion_mask(first).sum() == 2 * disc.sum()  # nothing lost: both slices still suggested
    # A correction by the user after that growth is an edit, and is named so.
    corrected = manager.suggestion_mask(first)
    corrected[1, 0:2, 0:2] = True
    replace_segment_mask(manager.preview_node, first, corrected, volume)
    with pytest.raises(SuggestionError, match="was edited since the undo"):
        manager.redo()
