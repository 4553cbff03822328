"""The Export save dialog (PySide6, Qt's own file dialog): the chosen format's suffix on a name typed without one, and
Qt's question before a file of the suffixed name is replaced."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys

import pytest

from MedSIGHTSlicerLib.export import (
    EXPORT_FOLDER_KEY,
    EXPORT_FORMATS,
    EXPORT_SUFFIXES,
    export_path,
    export_suffix,
    proposed_path,
)
from MedSIGHTSlicerLib.export_dialog import ask_export_path, export_dialog
from MedSIGHTSlicerLib.qt_shim import qt


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    application.processEvents()


@pytest.fixture
def store(tmp_path):
    """Slicer's settings file: a real QSettings INI file."""
    return qt.QSettings(str(tmp_path / "Slicer.ini"), qt.QSettings.IniFormat)


def type_into_dialog(name: str, on_question=None) -> list[str]:
    """When the dialog opens: type ``name`` and press Save; ``on_question(box)`` answers a question the dialog asks
    (then the dialog is cancelled if it stayed open). Returns the questions' texts."""
    questions: list[str] = []

    def answer() -> None:
        box = qt.QApplication.activeModalWidget()
        questions.append(str(box.text()))
        on_question(box)

    def save() -> None:
        dialog = qt.QApplication.activeModalWidget()
        dialog.selectFile(name)
        if on_question is not None:
            qt.QTimer.singleShot(0, answer)
        dialog.accept()
        if dialog.isVisible():
            dialog.reject()

    qt.QTimer.singleShot(0, save)
    return questions


def test_the_dialog_proposes_the_export_file_in_the_chosen_format(app, store, tmp_path):
    store.setValue(EXPORT_FOLDER_KEY, str(tmp_path))
    for index, (pattern, suffixes) in enumerate(EXPORT_FORMATS):
        dialog = export_dialog(store, str(tmp_path / "Documents"), "3: AX T1/POST", index)
        assert [str(f) for f in dialog.selectedFiles()] == [proposed_path(store, "", "3: AX T1/POST", suffixes[0])]
        assert [str(f) for f in dialog.nameFilters()] == [pattern]
        dialog.deleteLater()


@pytest.mark.parametrize("index", range(len(EXPORT_FORMATS)))
def test_a_name_typed_without_a_suffix_gets_the_chosen_formats(app, store, tmp_path, index):
    """Qt's save dialog gave back "liver" as typed (checked: .../liver, for every format), which every writer refused
    ("choose a file name ending in ..."); the format box beside Export had said which one."""
    suffix = EXPORT_FORMATS[index][1][0]
    type_into_dialog("liver")
    assert ask_export_path(store, str(tmp_path), "CT", index) == str(tmp_path / f"liver{suffix}")
    # What the module's QFileDialog.getSaveFileName(None, title, proposed, pattern) did: no default suffix.
    bare = export_dialog(store, str(tmp_path), "CT", index)
    bare.setDefaultSuffix("")
    type_into_dialog("liver")
    assert bare.exec() and [str(f) for f in bare.selectedFiles()] == [str(tmp_path / "liver")]


def test_a_suffix_typed_is_kept(app, store, tmp_path):
    """The file name picks the writer: "liver.nii" typed with the .seg.nrrd format chosen stays a NIfTI file."""
    typed = f"liver{EXPORT_FORMATS[1][1][1]}"
    type_into_dialog(typed)
    assert ask_export_path(store, str(tmp_path), "CT", 0) == str(tmp_path / typed)


def test_an_earlier_export_of_the_suffixed_name_is_replaced_only_when_the_user_agrees(app, store, tmp_path):
    """The suffix goes on inside the dialog, so its overwrite question names the file that would be replaced:
    appended after the dialog, an earlier liver.seg.nrrd was replaced unasked."""
    earlier = tmp_path / f"liver{EXPORT_FORMATS[0][1][0]}"
    earlier.write_bytes(b"earlier export")
    questions = type_into_dialog("liver", lambda box: box.button(qt.QMessageBox.No).click())
    assert ask_export_path(store, str(tmp_path), "CT", 0) == ""  # "No", then Cancel: nothing chosen
    assert len(questions) == 1 and earlier.name in questions[0]
    assert earlier.read_bytes() == b"earlier export"

    questions = type_into_dialog("liver", lambda box: box.button(qt.QMessageBox.Yes).click())
    assert ask_export_path(store, str(tmp_path), "CT", 0) == str(earlier)
    assert len(questions) == 1 and earlier.name in questions[0]


def test_cancel_chooses_nothing(app, store, tmp_path):
    qt.QTimer.singleShot(0, lambda: qt.QApplication.activeModalWidget().reject())
    assert ask_export_path(store, str(tmp_path), "CT", 0) == ""


@pytest.mark.parametrize("index", range(len(EXPORT_FORMATS)))
def test_a_name_with_a_dot_but_no_export_suffix_gets_the_chosen_formats(app, store, tmp_path, index):
    """Qt appends its default suffix only to a name without any dot: "liver.v2" came back as typed, and the export
    said "liver.v2: choose a file name ending in ...". Only an export suffix counts as one."""
    suffix = EXPORT_FORMATS[index][1][0]
    type_into_dialog("liver.v2")
    path = ask_export_path(store, str(tmp_path), "CT", index)
    assert path == str(tmp_path / f"liver.v2{suffix}")
    assert export_suffix(path) == suffix
    # Each export suffix, of any format and in any case, is kept as typed: the name picks the writer.
    for kept in EXPORT_SUFFIXES:
        typed = str(tmp_path / f"liver.v2{kept.upper()}")
        assert export_path(typed, index) == typed
    assert export_path(str(tmp_path / "liver."), index) == str(tmp_path / f"liver{suffix}")
    # The suffix's last part alone (".nrrd" of .seg.nrrd, ".gz" of .nii.gz) is completed, not doubled.
    last = suffix[suffix.rfind("."):]
    if last != suffix:
        assert export_path(str(tmp_path / f"liver{last.upper()}"), index) == str(tmp_path / f"liver{suffix}")
        assert export_path(str(tmp_path / last), index) == str(tmp_path / f"{last}{suffix}")


def test_an_earlier_export_of_a_name_suffixed_after_the_dialog_is_replaced_only_when_the_user_agrees(app, store,
                                                                                                   tmp_path):
    """The suffix appended after the dialog (a name with a dot): the module asks, as Qt's dialog does for the names
    it suffixes itself; "No" opens the dialog again."""
    earlier = tmp_path / f"liver.v2{EXPORT_FORMATS[0][1][0]}"
    earlier.write_bytes(b"earlier export")
    reopened: list[str] = []

    def refuse(box) -> None:
        box.button(qt.QMessageBox.No).click()

        def cancel_reopened() -> None:
            dialog = qt.QApplication.activeModalWidget()
            reopened.append(os.path.basename(str(dialog.selectedFiles()[0])))
            dialog.reject()

        qt.QTimer.singleShot(0, cancel_reopened)

    questions = type_into_dialog("liver.v2", refuse)
    assert ask_export_path(store, str(tmp_path), "CT", 0) == ""
    assert len(questions) == 1 and earlier.name in questions[0]
    assert reopened == ["liver.v2"]  # the dialog again, the name as typed
    assert earlier.read_bytes() == b"earlier export"

    questions = type_into_dialog("liver.v2", lambda box: box.button(qt.QMessageBox.Yes).click())
    assert ask_export_path(store, str(tmp_path), "CT", 0) == str(earlier)
    assert len(questions) == 1 and earlier.name in questions[0]
