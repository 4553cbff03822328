"""The suggestion list under the conversation: review each suggested segment before it counts.

One row per suggestion (colour, name, the slices it covers, confidence, the question it answers); several rows can
be selected and accepted or rejected together. Buttons and keys (``shortcuts``) accept, reject, show/hide, jump
to, correct (Segment Editor), undo and redo; the "Accept into" choices pick the segmentation and whether accepted
suggestions become new segments or are merged into one named segment. All decisions live in ``review.Review``;
this widget only shows its rows and forwards the user's actions. Qt goes through the shim, so the same code runs
under PythonQt in Slicer and PySide6 in the tests.

Host hooks: ``on_edit(EditorSelection)`` (open the Segment Editor), ``on_changed()`` (anything was accepted,
rejected, undone or redone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import shortcuts, theme
from .geometry import GeometryError
from .qt_shim import connect, grab_png, prop, qt
from .review import EditorSelection, Review
from .suggestions import SuggestionError

__all__ = ["COLUMNS", "SuggestionList"]

COLUMNS = ("Suggestion", "Slices", "Confidence", "Question")
_NEW_SEGMENTS = "New segments"


class SuggestionList:
    """The review widget (``list.widget``) over a ``Review`` (``set_review``; None shows an empty list)."""

    def __init__(self, parent: Any = None) -> None:
        self.review: Review | None = None
        self.on_edit: Callable[[EditorSelection], None] | None = None
        self.on_changed: Callable[[], None] | None = None
        self._building = False
        self._build(parent)

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build(self, parent: Any) -> None:
        self.widget = qt.QWidget(parent) if parent is not None else qt.QWidget()
        self.widget.setObjectName("MedSIGHTSuggestionList")
        layout = qt.QVBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)

        self.table = qt.QTreeWidget()
        self.table.setObjectName("suggestionTree")
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHeaderLabels(list(COLUMNS))
        self.table.setRootIsDecorated(False)
        self.table.setAlternatingRowColors(True)
        self.table.setSelectionMode(qt.QAbstractItemView.ExtendedSelection)
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setMinimumHeight(120)
        connect(self.table, "itemSelectionChanged", self._update_buttons)
        connect(self.table, "itemDoubleClicked", lambda *_: self.jump())
        layout.addWidget(self.table, 1)

        actions = qt.QHBoxLayout()
        self.accept_button = self._button("Accept", "acceptButton", "Accept the selected suggestions (A)", self.accept)
        self.reject_button = self._button("Reject", "rejectButton", "Reject the selected suggestions (R)", self.reject)
        self.toggle_button = self._button("Show/Hide", "toggleButton", "Show or hide the selected suggestions (H)",
                                          self.toggle)
        self.jump_button = self._button("Jump", "jumpButton", "Centre the views on the selected suggestion (J)",
                                        self.jump)
        self.edit_button = self._button("Correct…", "editButton",
                                        "Correct the selected suggestion in the Segment Editor, then accept it (E)",
                                        self.edit)
        for button in (self.accept_button, self.reject_button, self.toggle_button, self.jump_button,
                       self.edit_button):
            actions.addWidget(button)
        layout.addLayout(actions)

        history = qt.QHBoxLayout()
        self.undo_button = self._button("Undo", "undoButton", "Undo the last accept, reject or merge (Ctrl+Z)",
                                        self.undo)
        self.redo_button = self._button("Redo", "redoButton", "Redo (Ctrl+Y)", self.redo)
        self.show_3d = qt.QCheckBox("Show 3D")
        self.show_3d.setObjectName("show3DCheckBox")
        self.show_3d.setToolTip("Show suggestions and accepted segments as surfaces in the 3D view")
        connect(self.show_3d, "toggled", self._show_3d_toggled)
        for widget in (self.undo_button, self.redo_button):
            history.addWidget(widget)
        history.addStretch(1)
        history.addWidget(self.show_3d)
        layout.addLayout(history)

        target = qt.QHBoxLayout()
        target.addWidget(qt.QLabel("Accept into:"))
        self.target_combo = qt.QComboBox()
        self.target_combo.setObjectName("targetComboBox")
        self.target_combo.setToolTip("The segmentation accepted suggestions go into")
        self.mode_combo = qt.QComboBox()
        self.mode_combo.setObjectName("mergeComboBox")
        self.mode_combo.setToolTip("New segments, or merge into one existing segment (only the one you name)")
        target.addWidget(self.target_combo, 1)
        target.addWidget(self.mode_combo, 1)
        layout.addLayout(target)
        connect(self.target_combo, "currentIndexChanged", self._target_changed)
        connect(self.mode_combo, "currentIndexChanged", self._mode_changed)

        self.message = qt.QLabel("")
        self.message.setObjectName("reviewMessageLabel")
        self.message.setWordWrap(True)
        self.message.setTextFormat(qt.Qt.PlainText)  # segment names are the user's text: never read as HTML
        layout.addWidget(self.message)

        self.shortcuts = shortcuts.ShortcutSet(
            self.table, shortcuts.LIST_SHORTCUTS, self.actions(), qt.Qt.WidgetWithChildrenShortcut
        )
        self.apply_palette()
        self.refresh()

    def _button(self, text: str, name: str, tip: str, action: Callable[[], Any]) -> Any:
        button = qt.QPushButton(text)
        button.setObjectName(name)
        button.setToolTip(tip)
        connect(button, "clicked", lambda *_: action())
        return button

    def actions(self) -> dict[str, Callable[[], Any]]:
        """The shortcut actions by name (``shortcuts`` tables refer to these)."""
        return {"accept": self.accept, "reject": self.reject, "next": self.next, "previous": self.previous,
                "toggle": self.toggle, "jump": self.jump, "edit": self.edit, "undo": self.undo, "redo": self.redo}

    def apply_palette(self) -> None:
        """Re-colour the message line after a theme change (its colours come from the palette)."""
        self._show_message(prop(self.message, "text"), error=getattr(self, "_error_shown", False))

    # -- state -----------------------------------------------------------------------------------------------------
    def set_review(self, review: Review | None) -> None:
        """Show another volume's suggestions (None: none)."""
        if review is not self.review:
            # Suggestion ids repeat across volumes ("MedSIGHT_2" in each): a selection made in one volume's rows must
            # not select, and then accept, another's.
            self.table.clearSelection()
        self.review = review
        if review is not None:
            self.show_3d.setChecked(review.show_3d)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the rows and choices from MRML, keeping the selection (call after suggestions change)."""
        selected = set(self.selected_ids())
        self._building = True
        try:
            self.table.clear()
            rows = self.review.rows() if self.review is not None else []
            for row in rows:
                confidence = "" if row.confidence is None else f"{row.confidence:.0%}"
                item = qt.QTreeWidgetItem([row.name, row.slices, confidence, row.question])
                item.setData(0, qt.Qt.UserRole, row.segment_id)
                item.setIcon(0, _swatch(row.color, row.visible))
                item.setToolTip(3, row.question)
                if not row.visible:
                    item.setToolTip(0, f"{row.name} (hidden)")
                self.table.addTopLevelItem(item)
                if row.segment_id in selected:
                    item.setSelected(True)
            for column in range(len(COLUMNS) - 1):
                self.table.resizeColumnToContents(column)
            self._fill_targets()
        finally:
            self._building = False
        self._update_buttons()

    def _fill_targets(self) -> None:
        review = self.review
        self.target_combo.clear()
        if review is None:
            self._fill_modes(None)
            return
        nodes = review.targets()
        if not nodes:
            self.target_combo.addItem(f"{review.manager.volume_node.GetName()} segmentation (new)", "")
        for node in nodes:
            self.target_combo.addItem(node.GetName(), node.GetID())
        # A chosen segmentation that left the scene is not offered: the first one is shown, with its segments, and is
        # the choice (new segments), so Accept does what the boxes show (a merge's segment id may repeat there).
        if review.target is not None and review.target not in nodes:
            review.target, review.merge_into = None, ""
        current = review.target if review.target in nodes else (nodes[0] if nodes else None)
        self.target_combo.setCurrentIndex(nodes.index(current) if current in nodes else 0)
        self._fill_modes(current)

    def _fill_modes(self, node: Any) -> None:
        self.mode_combo.clear()
        self.mode_combo.addItem(_NEW_SEGMENTS, "")
        review = self.review
        for segment_id, name in Review.segments_of(node):
            self.mode_combo.addItem(f"Merge into '{name}'", segment_id)
        wanted = review.merge_into if review is not None else ""
        ids = [self.mode_combo.itemData(n) or "" for n in range(int(prop(self.mode_combo, "count")))]
        if wanted not in ids or (review is not None and review.merge_segment_gone()):
            # The segment to merge into was deleted (Segment Editor): the box shows "New segments", and so it is;
            # else every Accept would fail on the gone segment while the box offered nothing to pick it away with. A
            # new segment given its id is another segment, not the one chosen.
            wanted = review.merge_into = ""
        self.mode_combo.setCurrentIndex(ids.index(wanted))

    def _shown_target(self) -> Any:
        """The segmentation the "Accept into" box shows (None: the user's own, not made yet)."""
        node_id = self.target_combo.itemData(int(prop(self.target_combo, "currentIndex")))
        return self.review.manager.scene.GetNodeByID(node_id) if node_id else None

    def _target_changed(self, *_: Any) -> None:
        if self._building or self.review is None:
            return
        node = self._shown_target()
        self.review.set_target(node)
        self._building = True
        try:
            self._fill_modes(node)
        finally:
            self._building = False

    def _mode_changed(self, *_: Any) -> None:
        if self._building or self.review is None:
            return
        index = int(prop(self.mode_combo, "currentIndex"))
        merge_id = self.mode_combo.itemData(index) or ""
        # The merge choices are the shown segmentation's segments, so the merge names a segment of that one.
        self._run(lambda: self.review.set_target(self._shown_target(), merge_into=merge_id), changed=False)

    def selected_ids(self) -> list[str]:
        """Segment ids of the selected rows, in list order."""
        ids = []
        for n in range(int(prop(self.table, "topLevelItemCount"))):
            item = self.table.topLevelItem(n)
            if item.isSelected():
                ids.append(str(item.data(0, qt.Qt.UserRole)))
        return ids

    def row_ids(self) -> list[str]:
        """Segment ids of all rows, in list order."""
        count = int(prop(self.table, "topLevelItemCount"))  # a property in PythonQt, a method in PySide
        return [str(self.table.topLevelItem(n).data(0, qt.Qt.UserRole)) for n in range(count)]

    def select(self, segment_ids) -> None:
        wanted = set(segment_ids)
        current = None
        for n in range(int(prop(self.table, "topLevelItemCount"))):
            item = self.table.topLevelItem(n)
            chosen = str(item.data(0, qt.Qt.UserRole)) in wanted
            item.setSelected(chosen)
            if chosen and current is None:
                current = item
        if current is not None:
            self.table.setCurrentItem(current, 0, qt.QItemSelectionModel.NoUpdate)
            self.table.scrollToItem(current)
        self._update_buttons()

    def _update_buttons(self) -> None:
        any_selected = bool(self.selected_ids())
        for button in (self.accept_button, self.reject_button, self.toggle_button, self.jump_button):
            button.setEnabled(any_selected)
        self.edit_button.setEnabled(len(self.selected_ids()) == 1)
        manager = self.review.manager if self.review is not None else None
        self.undo_button.setEnabled(bool(manager is not None and manager.can_undo))
        self.redo_button.setEnabled(bool(manager is not None and manager.can_redo))

    # -- actions ---------------------------------------------------------------------------------------------------
    def _show_message(self, text: str, error: bool = False) -> None:
        self._error_shown = error
        self.message.setText(text)
        colours = theme.colours_of(self.widget)  # read now: Slicer's theme can change while the module is shown
        self.message.setStyleSheet(f"color: {colours.error if error else colours.secondary};")

    def _run(self, action: Callable[[], Any], changed: bool = True) -> Any:
        """Run a review action; a refusal (edited since, gone, ...) is shown, never raised into Slicer."""
        if self.review is None:
            return None
        try:
            result = action()
        except (SuggestionError, GeometryError) as err:  # GeometryError: e.g. a jump under a warping transform
            self._show_message(str(err), error=True)
            self.refresh()
            return None
        self._show_message("")
        if changed:
            self.refresh()
            if self.on_changed is not None:
                self.on_changed()
        return result

    def _select_row(self, position: int) -> None:
        """After an accept or reject, select the row that took the first removed one's place (so A and R can walk
        through the list)."""
        rows = self.row_ids()
        if rows:
            self.select([rows[min(len(rows) - 1, position)]])

    def _selection_gone(self, ids: list[str]) -> bool:
        """Whether selected rows name suggestions deleted since the list was built (the Segment Editor can delete a
        preview segment): then nothing is done, the message names them as the rows did (not by id), and the rows
        are rebuilt."""
        present = set(self.review.manager.suggestion_ids()) if self.review is not None else set()
        gone = [sid for sid in ids if sid not in present]
        if not gone:
            return False
        names = [self.table.topLevelItem(self.row_ids().index(sid)).text(0) for sid in gone]
        which = f"'{names[0]}' is" if len(names) == 1 else f"{', '.join(repr(n) for n in names)} are"
        self._show_message(f"{which} no longer among the suggestions (deleted from the suggestions' segmentation "
                           "since): nothing was done. The list is updated; select again.", error=True)
        self.refresh()
        return True

    def accept(self) -> list[str]:
        ids = self.selected_ids()
        if not ids or self._selection_gone(ids):
            return []
        position = self.row_ids().index(ids[0])
        accepted = self._run(lambda: self.review.accept(ids)) or []
        if accepted:
            count = len(ids)
            merge = self.review.merge_into
            where = f"merged into '{_segment_name(self.review, merge)}'" if merge else "as new segments"
            self._show_message(f"Accepted {count} suggestion{'s' if count > 1 else ''} {where}.")
            self._select_row(position)
        return accepted

    def reject(self) -> list[str]:
        ids = self.selected_ids()
        if not ids or self._selection_gone(ids):
            return []
        position = self.row_ids().index(ids[0])
        rejected = self._run(lambda: self.review.reject(ids)) or []
        if rejected:
            self._select_row(position)
        return rejected

    def undo(self) -> bool:
        return bool(self._run(lambda: self.review.undo()))

    def redo(self) -> bool:
        return bool(self._run(lambda: self.review.redo()))

    def toggle(self) -> None:
        ids = self.selected_ids()
        if ids and not self._selection_gone(ids):
            self._run(lambda: self.review.toggle_visible(ids), changed=False)
            self.refresh()

    def next(self) -> None:
        self._step(1)

    def previous(self) -> None:
        self._step(-1)

    def _step(self, step: int) -> None:
        if self.review is None:
            return
        ids = self.selected_ids()
        current = ids[-1] if step > 0 and ids else (ids[0] if ids else None)
        target = self.review.neighbour(current, step)
        if target is not None:
            self.select([target])

    def jump(self) -> None:
        ids = self.selected_ids()
        if not ids or self.review is None or self._selection_gone(ids[:1]):
            return
        self._run(lambda: self.review.jump_to(ids[0]), changed=False)

    def edit(self) -> None:
        ids = self.selected_ids()
        if len(ids) != 1 or self.review is None or self._selection_gone(ids):
            return
        selection = self._run(lambda: self.review.editor_selection(ids[0]), changed=False)
        if selection is not None and self.on_edit is not None:
            self.on_edit(selection)
            self._show_message(
                f"Correct '{self.review.manager.suggestion(ids[0]).GetName()}' in the Segment "
                "Editor, then come back and accept it."
            )

    def _show_3d_toggled(self, checked: Any) -> None:
        if self.review is not None:
            self._run(lambda: self.review.set_show_3d(bool(checked)), changed=False)

    def save_screenshot(self, path: str) -> bool:
        return grab_png(self.widget, path)

    def close(self) -> None:
        self.shortcuts.close()
        self.widget.close()
        self.widget.deleteLater()


def _segment_name(review: Review, segment_id: str) -> str:
    node = review.target if review.target is not None else review.manager.find_user_node()
    segment = None if node is None else node.GetSegmentation().GetSegment(segment_id)
    return segment.GetName() if segment is not None else segment_id


def _swatch(color, visible: bool) -> Any:
    """A small square of the segment's colour (hollow when the suggestion is hidden)."""
    pixmap = qt.QPixmap(14, 14)
    pixmap.fill(qt.QColor(0, 0, 0, 0))
    painter = qt.QPainter(pixmap)
    rgb = qt.QColor(*(round(255 * c) for c in color))
    painter.setPen(rgb)
    if visible:
        painter.fillRect(1, 1, 12, 12, rgb)
    else:
        painter.drawRect(1, 1, 11, 11)
    painter.end()
    return qt.QIcon(pixmap)
