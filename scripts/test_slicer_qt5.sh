#!/usr/bin/env bash
# The module's widget tests again on Qt 5.15, the Qt that 3D Slicer 5.8 and 5.10 build PythonQt on; the main suite
# runs them on PySide6, which is Qt 6, where documents, paragraphs and margins do not always lay out as in Qt 5.
# qt_shim looks Qt up through qtpy, which takes PyQt5 with QT_API=pyqt5. PyQt5 goes into a folder of its own, not the
# venv: there qtpy would prefer it to PySide6 for every test. Usage (after scripts/setup.sh):
# bash scripts/test_slicer_qt5.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -m pip install -q --disable-pip-version-check --target "$WORK/qt5" PyQt5==5.15.11 PyQt5-Qt5==5.15.19 \
  PyQt5-sip==12.20.1
export PYTHONPATH="$WORK/qt5" QT_API=pyqt5 QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
# Fails unless the tests below really get Qt 5.15 (qtpy falls back to another binding it finds).
python -c "import sys, qtpy; print('== widget tests on', qtpy.API_NAME, qtpy.QT_VERSION); \
sys.exit(qtpy.API_NAME != 'PyQt5' or not qtpy.QT_VERSION.startswith('5.15.'))"
# The tests of the Lib files that draw with Qt (chat panel and its transcript, review list, settings, export dialog).
python -m pytest -q -p no:cacheprovider \
  Testing/MedSIGHTSlicerLib/test_chat_panel.py \
  Testing/MedSIGHTSlicerLib/test_transcript_view.py \
  Testing/MedSIGHTSlicerLib/test_streamed_review.py \
  Testing/MedSIGHTSlicerLib/test_review_host.py \
  Testing/MedSIGHTSlicerLib/test_suggestion_list.py \
  Testing/MedSIGHTSlicerLib/test_settings_page.py \
  Testing/MedSIGHTSlicerLib/test_export_dialog.py
