"""A collapsible engine log: the local engine's output and the errors a remote engine sent back.

Collapsed by default (one header line with the last message's first words); expanding shows the last
``MAX_LINES`` lines. Only what the engine printed and the error messages: the engine's own logs carry no pixels or
patient data, and nothing else is added here.
"""

from __future__ import annotations

import time
from typing import Any

from . import theme
from .qt_shim import connect, qt

__all__ = ["MAX_LINES", "EngineLog"]

MAX_LINES = 2000


class EngineLog:
    def __init__(self, parent: Any = None) -> None:
        self.widget = qt.QWidget(parent) if parent is not None else qt.QWidget()
        self.widget.setObjectName("MedSIGHTEngineLog")
        layout = qt.QVBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)
        self.toggle = qt.QToolButton()
        self.toggle.setObjectName("engineLogToggle")
        self.toggle.setCheckable(True)
        self.toggle.setChecked(False)
        self.toggle.setToolButtonStyle(qt.Qt.ToolButtonTextBesideIcon)
        self.toggle.setArrowType(qt.Qt.RightArrow)
        self.toggle.setAutoRaise(True)
        self.toggle.setText("Engine log")
        layout.addWidget(self.toggle)
        self.text = qt.QPlainTextEdit()
        self.text.setObjectName("engineLogText")
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(MAX_LINES)
        self.text.setVisible(False)
        self.text.setMinimumHeight(100)
        layout.addWidget(self.text)
        connect(self.toggle, "toggled", self.set_expanded)
        self.errors = 0
        self._partial_shown = False  # the last line is an unfinished one (a progress bar), redrawn in place

    @property
    def expanded(self) -> bool:
        return bool(self.toggle.isChecked())

    def set_expanded(self, expanded: Any) -> None:
        expanded = bool(expanded)
        if self.expanded != expanded:
            self.toggle.setChecked(expanded)  # re-enters through the toggled signal
            return
        self.toggle.setArrowType(qt.Qt.DownArrow if expanded else qt.Qt.RightArrow)
        self.text.setVisible(expanded)

    def append(self, text: str) -> None:
        """Output of the local engine (any number of lines; blank ones dropped).

        Only the last ``MAX_LINES`` can stay, so only they go to Qt, in one call: a flood (an engine looping on a
        warning, 100 000 lines between two polls) was laid out line by line and froze Slicer for seconds per poll."""
        lines = [line.rstrip() for line in str(text).splitlines() if line.strip()][-MAX_LINES:]
        if lines:
            self._add(lines[0])  # in place of an unfinished line shown last
            if len(lines) > 1:
                self.text.appendPlainText("\n".join(lines[1:]))
        self._header()

    def set_partial(self, line: str) -> None:
        """The line the engine is still writing (a download's progress bar): shown as the last line, replaced by its
        next state or by the finished line, so the log keeps one line per progress bar ("" removes it)."""
        line = str(line).rstrip()
        if line.strip():
            self._add(line)
            self._partial_shown = True
        elif self._partial_shown:
            cursor = self._last_block()
            cursor.removeSelectedText()
            cursor.deletePreviousChar()  # the line break before it (nothing when it was the only line)
            self._partial_shown = False
        self._header()

    def append_error(self, message: str) -> None:
        """An error the engine (local or remote) answered with, time-stamped and in the palette's error colour."""
        self.errors += 1
        stamp = time.strftime("%H:%M:%S")
        colour = theme.colours_of(self.text).error
        self._partial_shown = False  # a progress line before the error stays as it was
        self.text.appendHtml(f'<span style="color:{colour}">{stamp} error: {_escape(message)}</span>')
        self._header()

    def _add(self, line: str) -> None:
        """Append ``line``, or put it in place of the unfinished line shown last."""
        if self._partial_shown:
            self._last_block().insertText(line)
            self._partial_shown = False
        else:
            self.text.appendPlainText(line)

    def _last_block(self) -> Any:
        """A cursor selecting the text of the last line."""
        cursor = self.text.textCursor()
        cursor.movePosition(qt.QTextCursor.End)
        cursor.movePosition(qt.QTextCursor.StartOfBlock, qt.QTextCursor.KeepAnchor)
        return cursor

    def lines(self) -> list[str]:
        return str(self.text.toPlainText()).splitlines()

    def clear(self) -> None:
        self.text.clear()
        self.errors = 0
        self._partial_shown = False
        self._header()

    def _header(self) -> None:
        lines = self.lines()
        last = lines[-1] if lines else ""
        suffix = f" ({self.errors} error{'s' if self.errors != 1 else ''})" if self.errors else ""
        self.toggle.setText(f"Engine log{suffix}" + (f": {last[:60]}" if last else ""))


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))
