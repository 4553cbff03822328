"""Keyboard shortcuts of the review: one table, used to install them and to list them in the module's help.

Undo and redo (Ctrl+Z / Ctrl+Y, and Ctrl+Shift+Z) act while the module is shown: the host installs them on its
main window and enables them only between the module's enter() and exit(). The single-letter review keys act only
while the keyboard focus is in the suggestion list, so typing a question or using Slicer's view keys (which are
single letters too) is never taken over.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .qt_shim import connect, qt

__all__ = ["LIST_SHORTCUTS", "MODULE_SHORTCUTS", "Shortcut", "ShortcutSet", "help_html"]


@dataclass(frozen=True)
class Shortcut:
    keys: str
    action: str  # the name of the callable in the actions mapping
    text: str


#: Active while the module is shown.
MODULE_SHORTCUTS = (
    Shortcut("Ctrl+Z", "undo", "Undo the last accept, reject or merge"),
    Shortcut("Ctrl+Y", "redo", "Redo it"),
    Shortcut("Ctrl+Shift+Z", "redo", "Redo it (alternative)"),
)
#: Active while the suggestion list has the keyboard focus.
LIST_SHORTCUTS = (
    Shortcut("A", "accept", "Accept the selected suggestions"),
    Shortcut("R", "reject", "Reject the selected suggestions"),
    Shortcut("N", "next", "Select the next suggestion"),
    Shortcut("P", "previous", "Select the previous suggestion"),
    Shortcut("H", "toggle", "Show or hide the selected suggestions"),
    Shortcut("J", "jump", "Centre the views on the selected suggestion"),
    Shortcut("E", "edit", "Correct the selected suggestion in the Segment Editor"),
)


class ShortcutSet:
    """QShortcuts for ``table`` on ``owner``, calling ``actions[shortcut.action]``; keep the set referenced (Qt
    shortcuts without a Python reference are collected in PythonQt and PySide)."""

    def __init__(self, owner: Any, table, actions: Mapping[str, Callable[[], Any]], context: Any) -> None:
        self.shortcuts = []
        for entry in table:
            if entry.action not in actions:
                continue
            shortcut = qt.QShortcut(qt.QKeySequence(entry.keys), owner)
            shortcut.setContext(context)
            connect(shortcut, "activated", _call(actions[entry.action]))
            self.shortcuts.append(shortcut)

    def set_enabled(self, enabled: bool) -> None:
        for shortcut in self.shortcuts:
            shortcut.setEnabled(bool(enabled))

    def close(self) -> None:
        for shortcut in self.shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []


def _call(action: Callable[[], Any]) -> Callable[..., None]:
    def slot(*_: Any) -> None:
        action()

    return slot


def help_html() -> str:
    """The shortcut list for the module's help text."""
    rows = [*MODULE_SHORTCUTS, *LIST_SHORTCUTS]
    items = "".join(f"<li><b>{html.escape(s.keys)}</b>: {html.escape(s.text)}</li>" for s in rows)
    return f"<p>Review shortcuts (letters act while the suggestion list has the focus):</p><ul>{items}</ul>"
