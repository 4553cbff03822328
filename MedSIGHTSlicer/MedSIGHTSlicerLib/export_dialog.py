"""The Export button's save dialog: which file the user's segmentation goes to, in the format chosen beside it.

Qt's save dialog hands back a name typed without a suffix as it was typed ("liver"), which no writer takes: the export
then failed with "choose a file name ending in ...", though the format box had said which format. With the chosen
format's suffix as the dialog's default suffix, the dialog itself appends it, and asks before replacing a file of that
name (appending it after the dialog would overwrite an earlier export unasked), as Slicer's own save dialogs do.

Qt appends that suffix only to a name without any dot: "liver.v2" came back as typed and no writer took it. Only an
export suffix counts as one (``export.export_path``): the chosen format's is appended after the dialog, which then
asks itself before that file is replaced, and "No" opens the dialog again, as Qt's own question does.
"""

from __future__ import annotations

import os
from typing import Any

from .export import EXPORT_FORMATS, export_path, proposed_path
from .qt_shim import qt

__all__ = ["ask_export_path", "export_dialog"]

TITLE = "Export segmentation"


def export_dialog(store: Any, default_folder: str, node_name: str, format_index: int, parent: Any = None) -> Any:
    """The save dialog for exporting ``node_name``'s segmentation in ``EXPORT_FORMATS[format_index]``, proposing the
    file ``export.proposed_path`` names (the last export's folder, else ``default_folder``)."""
    pattern, suffixes = EXPORT_FORMATS[int(format_index)]
    dialog = qt.QFileDialog(parent, TITLE)
    dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
    dialog.setNameFilter(pattern)
    dialog.setDefaultSuffix(suffixes[0].lstrip("."))  # Qt takes it without the leading dot ("seg.nrrd")
    dialog.selectFile(proposed_path(store, default_folder, node_name, suffixes[0]))
    return dialog


def ask_export_path(store: Any, default_folder: str, node_name: str, format_index: int, parent: Any = None) -> str:
    """Show `export_dialog` (modal) and return the file to write (``export.export_path`` of the one chosen), "" when
    cancelled."""
    dialog = export_dialog(store, default_folder, node_name, format_index, parent)
    try:
        # exec: a QDialog slot, found by PythonQt by that name (and as exec_) as by PySide6.
        while dialog.exec():
            chosen = [str(name) for name in dialog.selectedFiles()]
            if not chosen:
                return ""
            path = export_path(chosen[0], format_index)
            if path == chosen[0] or not os.path.exists(path) or _replace_agreed(parent, path):
                return path
            dialog.selectFile(chosen[0])  # "No": the dialog again, with the name as typed
        return ""
    finally:
        dialog.deleteLater()


def _replace_agreed(parent: Any, path: str) -> bool:
    """Qt's own question before its dialog replaces a file, for a file the dialog did not name."""
    buttons = qt.QMessageBox.Yes | qt.QMessageBox.No
    answer = qt.QMessageBox.question(parent, TITLE, f"{os.path.basename(path)} already exists.\nDo you want to "
                                     "replace it?", buttons, qt.QMessageBox.No)
    return answer == qt.QMessageBox.Yes
