"""Accepts go where Slicer saves them: on the lattice a segmentation was made on ("ReferenceImageGeometry"), which
does not follow its volume's spacing edits or a transform put over the segmentation later. Each case accepts,
saves the user's segmentation with Slicer's own storage node (.seg.nrrd), reads it back into a new scene and compares
world positions voxel by voxel (slicer-core MRML)."""

from __future__ import annotations

import re

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from medsight_testing.mrml import put_under_transform, world_points  # noqa: E402
from medsight_testing.review_scene import (  # noqa: E402
    add_shared_user_segments,
    ct_scene,
    organ_masks,
    segment_ids,
    slab_answer,
    user_segmentation,
)
from MedSIGHTSlicerLib.export import read_seg_nrrd  # noqa: E402
from MedSIGHTSlicerLib.geometry import ijk_to_ras, labelmap_from_array, segment_array, vtk_matrix  # noqa: E402
from MedSIGHTSlicerLib.suggestions import SuggestionError, SuggestionManager  # noqa: E402
from MedSIGHTSlicerLib.views import parent_to_world  # noqa: E402


def saved_and_read_back(node, path, scene):
    """``node`` written as Slicer's Save writes it (its own storage node; the writer collapses its layers in place)
    and read into ``scene`` (a new one, kept by the caller: a node does not keep its scene), under a copy of its
    transform, so world positions compare."""
    writer = node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(writer.GetID())
    assert writer.WriteData(node)
    back = read_seg_nrrd(path, scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(parent_to_world(node)))
    back.SetAndObserveTransformNodeID(transform.GetID())
    return back


def scale_spacing(volume, factor: float) -> None:
    """The Volumes module's spacing fields, all three times ``factor`` (the voxels stay, the grid shrinks or grows)."""
    grid = ijk_to_ras(volume)
    grid[:3, :3] *= factor
    volume.SetIJKToRASMatrix(vtk_matrix(grid))


def save_would_make(mask, volume, node, path) -> tuple[int, int]:
    """What Slicer's save makes of ``mask`` written on the volume's voxels as they are now into a segmentation with
    ``node``'s geometry (the accept before this fix): (suggested voxels lost, voxels gained), read on those voxels."""
    copy = node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode")
    copy.GetSegmentation().DeepCopy(node.GetSegmentation())  # its conversion parameters, the reference geometry too
    for segment_id in segment_ids(copy):
        copy.GetSegmentation().RemoveSegment(segment_id)
    copy.SetAndObserveTransformNodeID(node.GetTransformNodeID())
    segment = slicer.vtkSegment()
    segment.SetName("as shown")  # Slicer's writer aborts on a segment without a name
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              labelmap_from_array(mask, volume, copy, crop=True))
    copy.GetSegmentation().AddSegment(segment, "as shown")
    reloaded = slicer.vtkMRMLScene()
    back = saved_and_read_back(copy, path, reloaded)
    node.GetScene().RemoveNode(copy)
    on_volume = segment_array(back, "as shown", volume) if segment_ids(back) else np.zeros_like(mask)
    return int(np.count_nonzero(mask & ~on_volume)), int(np.count_nonzero(on_volume & ~mask))


def nearest_neighbour_change(mask, volume, node, made_on) -> tuple[int, int]:
    """(lost, gained) voxels of ``mask`` written nearest-neighbour onto the lattice ``made_on`` (the node's reference
    geometry, in its frame) and read back on the volume's voxels the same way: worked out with numpy alone."""
    to_node = np.linalg.inv(parent_to_world(node)) @ parent_to_world(volume) @ ijk_to_ras(volume)
    to_lattice = np.linalg.inv(made_on) @ to_node  # volume voxel index -> lattice index

    def nearest(matrix, ijk):
        return np.floor((matrix @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T + 0.5).astype(int)

    shape = np.array(mask.shape[::-1])
    every = np.argwhere(np.ones(mask.shape, dtype=bool))[:, ::-1]  # (i, j, k) of every volume voxel, k, j, i order
    near = nearest(to_lattice, np.argwhere(mask)[:, ::-1])
    box = np.stack(np.meshgrid(*(np.arange(lo - 2, hi + 3) for lo, hi in zip(near.min(0), near.max(0))),
                               indexing="ij"), -1).reshape(-1, 3)
    back_to = nearest(np.linalg.inv(to_lattice), box)
    inside = np.all((back_to >= 0) & (back_to < shape), axis=1)
    written = {tuple(r) for r, v, ok in zip(box, back_to, inside) if ok and mask[v[2], v[1], v[0]]}
    read = np.array([tuple(r) in written for r in nearest(to_lattice, every)]).reshape(mask.shape)
    return int(np.count_nonzero(mask & ~read)), int(np.count_nonzero(read & ~mask))


@pytest.fixture
def review():
    """The CT, the user's segmentation with "Liver" and "Kidney" (one shared layer, made on the CT as it was), and a
    manager."""
    scene, volume, voxels = ct_scene()
    user = user_segmentation(scene, volume)
    liver, kidney = organ_masks(voxels.shape)
    add_shared_user_segments(user, volume, {"Liver": liver, "Kidney": kidney})
    return scene, volume, user


@pytest.mark.parametrize("edit", ["spacing halved", "segmentation turned"])
def test_an_accept_the_saved_lattice_cannot_hold_is_refused_with_what_saving_would_do(review, edit, tmp_path):
    # Written on the volume's voxels as they are now, it was shown there and saved elsewhere: with the spacing halved,
    # the 9 voxels of a one-slice suggestion (odd slice, between two of the coarse slices) were all gone after save and
    # reload; under a transform turned 35 degrees, 8 came back, each moved.
    scene, volume, user = review
    made_on = ijk_to_ras(volume)
    if edit == "spacing halved":
        scale_spacing(volume, 0.5)
    else:
        put_under_transform(scene, user)
    users = {sid: world_points(user, sid) for sid in segment_ids(user)}
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(slab_answer(volume, 3, slice(20, 23), slice(25, 28)))
    mask = manager.suggestion_mask(sid)
    assert save_would_make(mask, volume, user, tmp_path / "as shown.seg.nrrd") != (0, 0)  # what the fix refuses
    lost, gained = nearest_neighbour_change(mask, volume, user, made_on)
    assert lost or gained

    with pytest.raises(SuggestionError) as refused:
        manager.accept(sid, target=user)
    message = str(refused.value)
    assert message.startswith("cannot accept 'Liver' into 'CT segmentation': Slicer saves that segmentation on the "
                              "grid it was made on, which is ")
    assert ("coarser than" if edit == "spacing halved" else "turned against") + " the voxels of 'CT'" in message
    said = {m.group(1): int(m.group(2)) for m in re.finditer(r"(lose|gain) (\d+)", message)}
    assert said == {key: n for key, n in (("lose", lost), ("gain", gained)) if n}
    assert f"of its {int(mask.sum())} voxels" in message or not lost
    assert "Specify geometry" in message
    # Made with the volume where it is in its own frame: under the volume's transform (none) again, it lines up.
    assert ("put 'CT segmentation' under no transform, as 'CT' is" in message) == (edit == "segmentation turned")
    # Nothing moved: the user's segments as they were, the suggestion still in the list.
    assert {sid: world_points(user, sid) for sid in segment_ids(user)}.keys() == users.keys()
    for segment_id, points in users.items():
        np.testing.assert_array_equal(world_points(user, segment_id), points)
    assert manager.suggestion_ids() == [sid] and not manager.can_undo
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)


def test_an_accept_onto_a_finer_saved_lattice_is_shown_saved_and_undone_as_it_is(review, tmp_path):
    # Spacing 1.5 times what the segmentation was made on: the 9 suggested voxels, written on the volume's voxels,
    # came back from the saved file as 40 voxels of the segmentation's own finer lattice, not where they were shown.
    scene, volume, user = review
    scale_spacing(volume, 1.5)
    users = {sid: world_points(user, sid) for sid in segment_ids(user)}
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(slab_answer(volume, 3, slice(20, 23), slice(25, 28)))
    mask = manager.suggestion_mask(sid)

    [accepted] = manager.accept(sid, target=user)
    shown = world_points(user, accepted)
    # On the segmentation's lattice, read on the volume's voxels it is exactly the suggestion, every one of its voxel
    # centres inside a suggested voxel.
    np.testing.assert_array_equal(segment_array(user, accepted, volume), mask)
    to_volume = np.linalg.inv(parent_to_world(volume) @ ijk_to_ras(volume))
    i, j, k = np.rint(to_volume @ np.c_[shown, np.ones(len(shown))].T)[:3].astype(int)
    assert mask[k, j, i].all() and len(shown) > mask.sum()

    reloaded = slicer.vtkMRMLScene()
    back = saved_and_read_back(user, tmp_path / "CT segmentation.seg.nrrd", reloaded)
    assert len(world_points(back, accepted)) == len(shown)
    np.testing.assert_allclose(world_points(back, accepted), shown, atol=1e-6)
    for segment_id, points in users.items():  # the user's own segments: not resampled, not moved
        np.testing.assert_allclose(world_points(user, segment_id), points, atol=1e-6)
        np.testing.assert_allclose(world_points(back, segment_id), points, atol=1e-6)

    # After the save (which collapsed the node's layers), undo still finds exactly what the accept wrote.
    assert manager.undo()
    assert sorted(segment_ids(user)) == sorted(users) and manager.suggestion_ids() == [sid]
    np.testing.assert_array_equal(manager.suggestion_mask(sid), mask)
    assert manager.redo()
    np.testing.assert_allclose(world_points(user, accepted), shown, atol=1e-6)


@pytest.mark.parametrize("factor", [1.5, 0.5])
def test_a_merge_goes_onto_the_saved_lattice_or_is_refused(review, factor, tmp_path):
    # With the spacing halved, the merge fell back to the volume's voxels (the segment's own coarser lattice would drop
    # suggested voxels), and the save put the merged segment back on that coarser lattice.
    scene, volume, user = review
    scale_spacing(volume, factor)
    liver_id = segment_ids(user)[0]
    liver = world_points(user, liver_id)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(slab_answer(volume, 3, slice(20, 23), slice(25, 28)))
    mask = manager.suggestion_mask(sid)
    if factor < 1:
        with pytest.raises(SuggestionError, match=r"cannot accept 'Liver' into 'CT segmentation': .* coarser than the "
                                                  rf"voxels of 'CT' now .* would lose {int(mask.sum())} of its"):
            manager.accept(sid, target=user, merge_into=liver_id)
        np.testing.assert_array_equal(world_points(user, liver_id), liver)
        assert manager.suggestion_ids() == [sid] and not manager.can_undo
        return
    manager.accept(sid, target=user, merge_into=liver_id)
    merged = world_points(user, liver_id)
    assert len(merged) > len(liver)
    assert {tuple(p) for p in np.round(liver, 6)} <= {tuple(p) for p in np.round(merged, 6)}  # none of its own moved
    assert np.array_equal(segment_array(user, liver_id, volume) & mask, mask)
    reloaded = slicer.vtkMRMLScene()
    back = saved_and_read_back(user, tmp_path / "merged.seg.nrrd", reloaded)
    np.testing.assert_allclose(world_points(back, liver_id), merged, atol=1e-6)
    assert manager.undo()
    np.testing.assert_allclose(world_points(user, liver_id), liver, atol=1e-6)


def test_the_segmentation_made_for_a_volume_under_a_turned_transform_saves_accepts_where_shown(tmp_path):
    # Its geometry was taken before it was put under the volume's transform: the volume's grid turned by that
    # transform a second time, so the 9 voxels accepted on the volume's voxels came back from the saved file as 8.
    scene, volume, _ = ct_scene()
    put_under_transform(scene, volume)
    manager = SuggestionManager(scene, volume)
    [sid] = manager.add_answer(slab_answer(volume, 3, slice(20, 23), slice(25, 28)))
    mask = manager.suggestion_mask(sid)
    [accepted] = manager.accept(sid)
    user = manager.find_user_node()
    shown = world_points(user, accepted)
    assert len(shown) == mask.sum()
    reloaded = slicer.vtkMRMLScene()
    back = saved_and_read_back(user, tmp_path / "CT segmentation.seg.nrrd", reloaded)
    assert len(world_points(back, accepted)) == len(shown)
    np.testing.assert_allclose(world_points(back, accepted), shown, atol=1e-6)


def test_a_segmentation_left_behind_by_a_registration_is_told_to_follow_the_volume_which_keeps_its_voxels(tmp_path):
    # The volume was registered (put under a turned transform) after the user's segmentation was made on it, and the
    # segmentation stayed where it was. The refusal only offered Specify geometry, which resamples the user's own
    # segments onto the turned lattice (120 of the first accept's voxels came back as 121, moved); putting the
    # segmentation under the volume's transform lines it up again with none of its voxels touched.
    scene, volume, _ = ct_scene()
    manager = SuggestionManager(scene, volume)
    [first] = manager.add_answer(slab_answer(volume, 3, slice(2, 12), slice(3, 15)))
    [kept] = manager.accept(first)
    user = manager.find_user_node()
    own = world_points(user, kept)
    transform = put_under_transform(scene, volume, translate=(0.0, 0.0, 0.0), rotate_z=10.0)
    transform.SetName("Registration")
    [sid] = manager.add_answer(slab_answer(volume, 3, slice(15, 30), slice(18, 38)))
    mask = manager.suggestion_mask(sid)

    with pytest.raises(SuggestionError) as refused:
        manager.accept(sid, target=user)
    message = str(refused.value)
    assert "turned against the voxels of 'CT'" in message
    assert "put 'CT segmentation' under the transform 'Registration', as 'CT' is" in message
    assert manager.suggestion_ids() == [sid]

    user.SetAndObserveTransformNodeID(transform.GetID())  # what the refusal says to do
    [accepted] = manager.accept(sid, target=user)
    np.testing.assert_array_equal(segment_array(user, accepted, volume), mask)
    moved = (parent_to_world(user) @ np.c_[own, np.ones(len(own))].T)[:3].T  # its voxels moved with the volume
    np.testing.assert_allclose(world_points(user, kept), moved[np.lexsort(moved.T[::-1])], atol=1e-6)
    reloaded = slicer.vtkMRMLScene()
    back = saved_and_read_back(user, tmp_path / "registered.seg.nrrd", reloaded)
    for segment_id in (kept, accepted):  # saved as shown: nothing resampled
        np.testing.assert_allclose(world_points(back, segment_id), world_points(user, segment_id), atol=1e-6)
