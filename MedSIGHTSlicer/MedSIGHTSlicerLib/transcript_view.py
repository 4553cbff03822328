"""Keeps a QTextBrowser showing a conversation whose end grows while an answer streams in.

The conversation's HTML is ``head + "".join(pieces) + end``: ``pieces`` are the lines of the answer being written
(each "<br>" and one inline line, all in the document's last paragraph), ``head`` everything before them, ``end``
what closes that paragraph. Replacing the whole HTML on every streamed event made each event cost the whole
answer so far (48 ms a render at 118 answered slices, 77 s of Slicer's main thread over their 2669 events;
benchmarks/slicer_chat_stream.py). Here only the pieces from the first one that changed onward are rewritten in the
document, in place; the rest of the document is rebuilt only when ``head`` or ``end`` changes.

Main thread only (it edits a widget's document).
"""

from __future__ import annotations

from typing import Any

from .qt_shim import prop, qt

__all__ = ["TranscriptView"]

_BREAK = "<br>"
_LINE_SEPARATOR = "\u2028"  # what Qt's HTML reader makes of each <br>
#: Characters that Qt's document reads as the bounds of paragraphs or frames (U+2029, U+FDD0, U+FDD1): a line holding
#: one, inserted in place, makes another document than the whole HTML, so the document is rebuilt instead.
_BLOCK_MARKS = ("\u2029", "\ufdd0", "\ufdd1")


class TranscriptView:
    """Shows ``head + pieces + end`` in ``browser``, rewriting as little of its document as it can.

    Attributes:
        rebuilds: how many times the whole HTML was set (the rest were edits of the changed pieces).
    """

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.rebuilds = 0
        self._head: str | None = None
        self._end: str | None = None
        self._pieces: list[str] = []
        self._starts: list[int] | None = None  # document position of each shown piece; None: not known
        self._size = -1  # the document's characterCount() after our last change (another change: rebuild)
        # Edits of the shown document are no user's undo history; recorded, they would keep every replaced line.
        prop(browser, "document").setUndoRedoEnabled(False)

    def show(self, head: str, pieces: list[str], end: str) -> None:
        """Make the browser show ``head + "".join(pieces) + end``."""
        document = prop(self.browser, "document")
        if head != self._head or end != self._end or self._starts is None or self._size != document.characterCount():
            self._rebuild(head, pieces, end)
            return
        same = 0
        for old, new in zip(self._pieces, pieces):
            if old != new:
                break
            same += 1
        if same == len(pieces) == len(self._pieces):
            return
        if not _editable(pieces[same:]):
            self._rebuild(head, pieces, end)
            return
        # Select from the first changed piece to the end of the answer (counted back from the end, as a cursor moves
        # one character at a time), and write the new pieces over it. Only calls that return a value move the
        # cursor: PySide6 6.12 under CPython 3.11 drops a reference to None on each call of a method returning void
        # (setPosition, removeSelectedText), and Python aborts once None's count (a few thousand) runs out.
        first = self._starts[same] if same < len(self._starts) else self._size - 1
        cursor = qt.QTextCursor(document)
        cursor.movePosition(qt.QTextCursor.End, qt.QTextCursor.MoveAnchor)
        cursor.movePosition(qt.QTextCursor.PreviousCharacter, qt.QTextCursor.KeepAnchor, self._size - 1 - first)
        cursor.insertHtml("".join(pieces[same:]))  # replaces the selection
        size = document.characterCount()
        # Read back what was written, to know where each new piece begins.
        cursor.movePosition(qt.QTextCursor.PreviousCharacter, qt.QTextCursor.KeepAnchor, size - 1 - first)
        starts = _piece_starts(str(prop(cursor, "selectedText")), first, pieces[same:])
        self._starts = None if starts is None else self._starts[:same] + starts
        self._pieces = list(pieces)
        self._size = size

    def _rebuild(self, head: str, pieces: list[str], end: str) -> None:
        self.rebuilds += 1
        self.browser.setHtml(head + "".join(pieces) + end)
        self._head, self._end, self._pieces = head, end, list(pieces)
        document = prop(self.browser, "document")
        self._size = document.characterCount()
        block = document.lastBlock()
        self._starts = _piece_starts(str(prop(block, "text")), int(block.position()), pieces)


def _piece_starts(text: str, position: int, pieces: list[str]) -> list[int] | None:
    """Where each piece begins in the document, given ``text``, what the pieces (and, before them, anything without a
    break) became from document position ``position`` on. Each piece begins with a break and holds
    ``count("<br>")`` of them (the lines' text is escaped, so "<br>" is only ever a break). None when the breaks do not
    add up (say, a line separator in an answer's text): each change then rebuilds the whole HTML."""
    if not _editable(pieces):
        return None
    breaks = [n for n, char in enumerate(text) if char == _LINE_SEPARATOR]
    if len(breaks) != sum(p.count(_BREAK) for p in pieces):
        return None
    starts, seen = [], 0
    for piece in pieces:
        starts.append(position + breaks[seen])
        seen += piece.count(_BREAK)
    return starts


def _editable(pieces: list[str]) -> bool:
    """Whether ``pieces`` can be written in place: each begins with a break, and none holds a paragraph mark."""
    return all(p.startswith(_BREAK) and not any(mark in p for mark in _BLOCK_MARKS) for p in pieces)
