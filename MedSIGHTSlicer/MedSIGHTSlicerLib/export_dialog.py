"""The Export button's save dialog: which file the user's segmentation goes to, in the format chosen beside it.

Qt's save dialog hands back a name typed without a suffix as it was typed ("liver"), which no writer takes: the export
then failed with "choose a file name ending in ...", though the format box had said which format. With the chosen
format's suffix as the dialog's default suffix, the dialog itself appends it, and asks before replacing a file of that
name (appending it after the dialog would overwrite an earlier export unasked), as Slicer's own save dialogs do.
"""

from __future__ import annotations

from typing import Any

from .export import EXPORT_FORMATS, proposed_path
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
    """Show `export_dialog` (modal) and return the file chosen, "" when cancelled."""
    dialog = export_dialog(store, default_folder, node_name, format_index, parent)
    # exec: a QDialog slot, found by PythonQt by that name (and as exec_) as by PySide6.
    chosen = list(dialog.selectedFiles()) if dialog.exec() else []
    dialog.deleteLater()
    return str(chosen[0]) if chosen else ""
