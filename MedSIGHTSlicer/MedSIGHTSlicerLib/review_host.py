"""The review widgets put together for the Slicer module: suggestion list, module shortcuts and engine log, wired
to the chat panel. Keeps the module file thin; the one Slicer-only call (open the Segment Editor) is the function
at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import review as review_lib
from . import shortcuts
from .engine_log import EngineLog
from .qt_shim import qt
from .suggestion_list import SuggestionList

__all__ = ["ReviewHost"]


class ReviewHost:
    """Args:
        panel: the ChatPanel whose answers become suggestions.
        volume: () -> the selected volume node (or None).
        logic: the module logic (``suggestion_manager(node)`` and ``take_answers(node, answers, serial, scope,
            question)``).
        main_window: where Ctrl+Z / Ctrl+Y live while the module is shown.
        answer_volume: () -> the volume the running question is about (its answers go there even if the selection
            changed meanwhile; None drops them, e.g. the volume was removed); default ``volume``.
    """

    def __init__(self, panel: Any, volume: Callable[[], Any], logic: Any, main_window: Any,
                 answer_volume: Callable[[], Any] | None = None) -> None:
        self.panel, self.volume, self.logic = panel, volume, logic
        self.answer_volume = answer_volume or volume
        self.list = SuggestionList()
        self.list.on_edit = open_in_segment_editor
        # Slicer started with --no-main-window (its generic module tests are) has no main window: a QShortcut needs a
        # parent widget, so the keys then live on the list (the same window-wide context once it is shown).
        owner = main_window if main_window is not None else self.list.widget
        self.module_keys = shortcuts.ShortcutSet(
            owner, shortcuts.MODULE_SHORTCUTS, self.list.actions(), qt.Qt.WindowShortcut
        )
        self.module_keys.set_enabled(False)  # enabled between the module's enter() and exit()
        self.engine_log = EngineLog()
        self._reviews: dict[int, review_lib.Review] = {}  # by id() of the volume's SuggestionManager
        panel.on_region_answers = self.take_answers  # suggestions appear slice by slice while an ask runs
        panel.on_answers = self.answers_done
        panel.on_error = self.engine_log.append_error

    def set_shown(self, shown: bool) -> None:
        """The module was entered or left: its keys follow, and on entering the colours follow Slicer's theme (which
        may have changed meanwhile, in Application Settings > Appearance)."""
        self.module_keys.set_enabled(shown)
        if shown:
            self.panel.apply_palette()
            self.list.apply_palette()

    def review(self, node: Any) -> review_lib.Review:
        """The review state (accept target, merge choice, Show 3D) of ``node``'s suggestions, kept per manager."""
        self._drop_gone_reviews()
        manager = self.logic.suggestion_manager(node)
        review = self._reviews.get(id(manager))
        if review is None or review.manager is not manager:
            review = self._reviews[id(manager)] = review_lib.Review(manager)
        return review

    def volume_changed(self, node: Any) -> None:
        """Show ``node``'s suggestions (none for no volume, or one that left the scene, e.g. on scene close)."""
        if node is None or node.GetScene() is None:
            self._drop_gone_reviews()
            self.list.set_review(None)
            return
        self.list.set_review(self.review(node))

    def _drop_gone_reviews(self) -> None:
        """Reviews of volumes that left the scene go: each holds its volume node, and with it the voxels."""
        self._reviews = {key: r for key, r in self._reviews.items() if r.manager.volume_node.GetScene() is not None}

    def take_answers(self, answers: list[Any]) -> None:
        """Answers that arrived together: their findings grow once (the list is refreshed once too)."""
        node = self.answer_volume()
        if node is not None:
            self.logic.take_answers(node, answers, self.panel.ask_serial, self.panel.last_scope,
                                    self.panel.last_question, model=getattr(self.panel, "last_model", "") or None)
            shown = self.list.review
            if shown is not None and shown.manager is self.logic.suggestion_manager(node):
                self.list.refresh()
            elif shown is None or node is self.volume():
                self.list.set_review(self.review(node))
            # else the user selected another volume meanwhile: its list stays shown (the answer's suggestions wait
            # in their own volume's list), or Accept all would act on one volume while the list showed another's.

    def answers_done(self, _answers: Any) -> None:
        node = self.answer_volume()
        if node is not None:
            self.logic.suggestion_manager(node).end_stream(f"ask-{self.panel.ask_serial}")

    def accept_all(self) -> None:
        node = self.volume()
        if node is not None:
            review = self.review(node)
            if self.list.review is not review:
                self.list.set_review(review)
            self.list.select(review.manager.suggestion_ids())
            self.list.accept()

    def close(self) -> None:
        self.module_keys.close()
        self.list.close()


def open_in_segment_editor(selection: review_lib.EditorSelection) -> None:
    """Correct a suggestion in the Segment Editor on the preview node; the list stays in MedSIGHT to accept it."""
    import slicer

    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.SegmentEditorWidget.editor
    editor.setSegmentationNode(selection.segmentation_node)
    editor.setSourceVolumeNode(selection.volume_node)
    editor.setCurrentSegmentID(selection.segment_id)
