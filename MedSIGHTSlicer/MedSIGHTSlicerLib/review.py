"""Annotator review of one volume's suggestions: what the suggestion list shows and does, over real MRML.

``Review`` wraps a ``suggestions.SuggestionManager`` with what the list needs beyond accept / reject / undo /
redo: one row per suggestion (colour, name, slices, confidence, question), the accept target (a segmentation of
the volume, default the user's own; new segments or, on request, a merge into one named segment), per-suggestion
visibility, the "Show 3D" closed surfaces, where to jump to, and which node / segment to open in the Segment
Editor for correcting a suggestion before accepting it.

Main-thread only (MRML is not thread-safe); no Qt, so every decision is tested with slicer-core's MRML.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import ijk_to_ras
from .suggestions import (
    TAG_CONFIDENCE,
    TAG_QUESTION,
    TAG_SLICE,
    SuggestionError,
    SuggestionManager,
    get_tag,
    is_same_segment,
    segment_ref,
)
from .views import centre_views_on

__all__ = ["EditorSelection", "Review", "SuggestionRow", "describe_slices", "take_answers"]


@dataclass(frozen=True)
class SuggestionRow:
    """One row of the suggestion list."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    slices: str
    confidence: float | None
    question: str
    visible: bool


@dataclass(frozen=True)
class EditorSelection:
    """What the Segment Editor must show to correct a suggestion: the preview node, its volume and the segment."""

    segmentation_node: object
    volume_node: object
    segment_id: str


def describe_slices(tag: str) -> str:
    """"axial:3;axial:4;axial:5;axial:9" -> "axial 3–5, 9" (runs of consecutive slices are shortened)."""
    by_plane: dict[str, list[int]] = {}
    for part in filter(None, (tag or "").split(";")):
        plane, _, index = part.partition(":")
        if index.lstrip("-").isdigit():
            by_plane.setdefault(plane, []).append(int(index))
    texts = []
    for plane, indices in by_plane.items():
        indices = sorted(set(indices))
        runs: list[list[int]] = []
        for index in indices:
            if runs and index == runs[-1][-1] + 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        spans = [str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs]
        texts.append(f"{plane} {', '.join(spans)}")
    return "; ".join(texts)


def take_answers(manager: SuggestionManager, answers, ask_serial: int, scope: str, question: str = "",
                 model: str | None = None) -> list[str]:
    """Slices' answers as they arrive together (the chat panel's ``on_region_answers``): a one-slice ask's regions
    are each a suggestion; a range or volume ask grows one suggestion per finding while it runs, once for all the
    answers that arrived together."""
    if scope == "current":
        return [sid for answer in answers for sid in manager.add_answer(answer, question=question, model=model)]
    return manager.add_streamed_answers(answers, f"ask-{ask_serial}", question=question, model=model)


class Review:
    """The review actions of one volume's suggestions.

    Args:
        manager: the volume's SuggestionManager (keep it referenced: it owns the undo history).

    Attributes:
        target: the segmentation node accepts go into (None: the user's own, created on the first accept).
        merge_into: a segment id of the target that accepts are united with (""; new segments).
    """

    def __init__(self, manager: SuggestionManager) -> None:
        self.manager = manager
        self.target = None
        self.merge_into = ""
        self._merge_name = ""  # the name of the segment merged into when it was chosen (it may be deleted since)
        self._merge_segment = None  # ``segment_ref`` of that segment: a new one given its id is not it
        self.show_3d = False
        #: node ID -> (had a closed surface, shown in 3D) of each accept target before "Show 3D" changed it, so turning
        #: it off gives the user's segmentation back its own 3D display
        self._target_3d_before: dict[str, tuple[bool, bool]] = {}

    # -- rows --------------------------------------------------------------------------------------------------
    def _preview_display(self):
        preview = self.manager.existing_preview_node()
        return None if preview is None else preview.GetDisplayNode()

    def rows(self) -> list[SuggestionRow]:
        display = self._preview_display()
        rows = []
        for segment_id in self.manager.suggestion_ids():
            segment = self.manager.suggestion(segment_id)
            confidence = get_tag(segment, TAG_CONFIDENCE)
            rows.append(
                SuggestionRow(
                    segment_id=segment_id,
                    name=segment.GetName(),
                    color=tuple(float(c) for c in segment.GetColor()),
                    slices=describe_slices(get_tag(segment, TAG_SLICE) or ""),
                    confidence=float(confidence) if confidence else None,
                    question=get_tag(segment, TAG_QUESTION) or "",
                    visible=True if display is None else bool(display.GetSegmentVisibility(segment_id)),
                )
            )
        return rows

    # -- accept target -----------------------------------------------------------------------------------------
    def targets(self) -> list:
        """Segmentation nodes of this volume to accept into (the user's own first)."""
        return self.manager.target_nodes()

    def set_target(self, node, merge_into: str = "") -> None:
        """Accept into ``node`` (None: the user's own) as new segments, or merged into its ``merge_into``."""
        if merge_into:
            owner = node if node is not None else self.manager.find_user_node()
            if owner is None or owner.GetSegmentation().GetSegment(merge_into) is None:
                raise SuggestionError(f"no segment {merge_into!r} to merge into")
            # The merge names a segment of this very node: kept, so that if it goes, the merge is refused instead of
            # landing in whichever segmentation is the user's own by then (segment ids repeat across nodes).
            node = owner
            self._merge_name = owner.GetSegmentation().GetSegment(merge_into).GetName()
            self._merge_segment = segment_ref(owner, merge_into)
        self.target, self.merge_into = node, merge_into
        if self.show_3d:
            self._refresh_3d()  # the surfaces move to the new target; the old one gets its own display back

    def merge_segment_gone(self) -> bool:
        """Whether a merge was chosen and the segment chosen is no longer there (deleted, its id maybe reused)."""
        if not self.merge_into:
            return False
        owner = self.target if self.target is not None else self.manager.find_user_node()
        return owner is None or not is_same_segment(self._merge_segment, owner, self.merge_into)

    @staticmethod
    def segments_of(node) -> list[tuple[str, str]]:
        """(segment id, name) of every segment of ``node``, in order (the "merge into" choices)."""
        if node is None:
            return []
        segmentation = node.GetSegmentation()
        return [
            (segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n).GetName())
            for n in range(segmentation.GetNumberOfSegments())
        ]

    # -- actions -----------------------------------------------------------------------------------------------
    def accept(self, segment_ids: Sequence[str]) -> list[str]:
        """Accept into the chosen target (merging only when a merge segment was chosen)."""
        if not segment_ids:
            return []
        target = self.target
        if target is not None and target.GetScene() is None:
            # The chosen segmentation was removed: refused, not redirected to the user's own without a word (and a
            # merge's segment id may name another segment there). The choice falls back to the own for the next try.
            what = "merge into" if self.merge_into else "accept into"
            self.target, self.merge_into = None, ""
            raise SuggestionError(f"the segmentation to {what} ({target.GetName()!r}) was removed: choose where to "
                                  "accept again")
        if self.merge_segment_gone():
            # Deleted since it was chosen (Segment Editor), also when another segment got its id since: named as the
            # user knew it, not by its id ("Segment_1").
            name, self.merge_into = self._merge_name, ""
            raise SuggestionError(f"the segment to merge into ({name!r}) was deleted: choose where to accept again")
        ids = self.manager.accept(list(segment_ids), target=target, merge_into=self.merge_into or None)
        self._refresh_3d()
        return ids

    def reject(self, segment_ids: Sequence[str]) -> list[str]:
        return self.manager.reject(list(segment_ids)) if segment_ids else []

    def undo(self) -> bool:
        done = self.manager.undo()
        self._refresh_3d()
        return done

    def redo(self) -> bool:
        done = self.manager.redo()
        self._refresh_3d()
        return done

    # -- display -----------------------------------------------------------------------------------------------
    def set_visible(self, segment_ids: Sequence[str], visible: bool) -> None:
        display = self._preview_display()
        if display is None:
            return
        for segment_id in segment_ids:
            display.SetSegmentVisibility(segment_id, bool(visible))

    def toggle_visible(self, segment_ids: Sequence[str]) -> bool:
        """Hide them all if any is shown, else show them all; returns the new visibility."""
        display = self._preview_display()
        if display is None or not segment_ids:
            return True
        visible = not any(display.GetSegmentVisibility(sid) for sid in segment_ids)
        self.set_visible(segment_ids, visible)
        return visible

    def set_show_3d(self, show: bool) -> None:
        """Closed surfaces of the preview and the accept target in the 3D view (or none)."""
        self.show_3d = bool(show)
        self._refresh_3d()

    def _target_node(self):
        target = self.target if self.target is not None else self.manager.find_user_node()
        return target if target is not None and target.GetScene() is not None else None

    def _refresh_3d(self) -> None:
        preview = self.manager.existing_preview_node()
        if preview is not None:
            _set_3d(preview, self.show_3d, had_surface=False)
        target = self._target_node() if self.show_3d else None
        # Only what Show 3D turned on is turned off again (it is off, or the target changed): the user's own surfaces
        # and 3D display come back as they were.
        for node_id, (had_surface, shown) in list(self._target_3d_before.items()):
            if target is not None and node_id == target.GetID():
                continue
            del self._target_3d_before[node_id]
            node = self.manager.scene.GetNodeByID(node_id)
            if node is not None:
                _set_3d(node, False, had_surface=had_surface)
                if node.GetDisplayNode() is not None:
                    node.GetDisplayNode().SetVisibility3D(shown)
        if target is None:
            return
        if target.GetID() not in self._target_3d_before:
            display = target.GetDisplayNode()
            self._target_3d_before[target.GetID()] = (
                target.GetSegmentation().ContainsRepresentation(_closed_surface_name()),
                display is not None and bool(display.GetVisibility3D()),
            )
        _set_3d(target, True, had_surface=self._target_3d_before[target.GetID()][0])

    # -- navigation --------------------------------------------------------------------------------------------
    def centre_ras(self, segment_id: str) -> np.ndarray:
        """The centre of a suggestion's voxels in the volume's own RAS frame (its IJKToRAS, before any transform)."""
        mask = self.manager.suggestion_mask(segment_id)
        voxels = np.argwhere(mask)
        if not len(voxels):
            raise SuggestionError(f"suggestion {segment_id!r} has no voxels to jump to")
        k, j, i = voxels.mean(axis=0)
        return (ijk_to_ras(self.manager.volume_node) @ np.array([i, j, k, 1.0]))[:3]

    def jump_to(self, segment_id: str) -> np.ndarray:
        """Centre every slice view on a suggestion, wherever its volume's transform puts it; returns the world point."""
        return centre_views_on(self.manager.scene, self.centre_ras(segment_id), self.manager.volume_node)

    def neighbour(self, current: str | None, step: int) -> str | None:
        """The suggestion ``step`` rows after ``current`` (wrapping; the first or last when there is none)."""
        ids = self.manager.suggestion_ids()
        if not ids:
            return None
        if current not in ids:
            return ids[0] if step >= 0 else ids[-1]
        return ids[(ids.index(current) + step) % len(ids)]

    def editor_selection(self, segment_id: str) -> EditorSelection:
        """Correcting a suggestion edits it in the preview node, so an accept then takes the corrected voxels."""
        self.manager.suggestion(segment_id)  # raises for an unknown id
        return EditorSelection(self.manager.preview_node, self.manager.volume_node, segment_id)


def _set_3d(node, shown: bool, had_surface: bool) -> None:
    """Show ``node``'s segments in 3D (making closed surfaces) or hide them, dropping the surfaces unless the node
    had them before or keeps its segments as surfaces (surfaces cost memory and time on every edit)."""
    if shown:
        node.CreateClosedSurfaceRepresentation()
    elif not had_surface and node.GetSegmentation().GetSourceRepresentationName() != _closed_surface_name():
        node.RemoveClosedSurfaceRepresentation()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetVisibility3D(bool(shown))


def _closed_surface_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
