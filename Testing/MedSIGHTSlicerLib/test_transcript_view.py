"""TranscriptView: an answer's lines edited in place leave the document that setting the whole HTML makes, also for
text that Qt's HTML reader treats specially (offscreen Qt, no engine)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys

import pytest

from MedSIGHTSlicerLib import chat_panel
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.theme import colours_of

#: Answer texts with spaces at either end, markup to escape, control characters, and the characters Qt reads as
#: line, paragraph or frame bounds.
TEXTS = ["The liver ", " the spleen", "two  spaces", "ends\n", "\nstarts", "tab\there", "cr\r\nlf", "  ", "",
         "<b>not bold</b> &amp;", "a\u2028b", "x\u2029y", "frame\ufdd0open", "frame\ufdd1shut", "\x0bvertical\x0c",
         "end  "]


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    application.processEvents()


def whole_html(panel: chat_panel.ChatPanel) -> str:
    browser = qt.QTextBrowser()
    browser.setHtml(chat_panel.render_html(panel._turns, colours_of(panel.conversation)))
    return str(browser.toHtml())


def test_lines_streamed_in_pieces_show_what_the_whole_html_shows(app):
    panel = chat_panel.ChatPanel(None)
    try:
        turn = chat_panel._Turn("Where is the liver?", "whole volume", 1, "axial")
        panel._turns.append(turn)
        differing, rebuilds_before_marks = [], 0
        for index, text in enumerate(TEXTS):
            if text == "x\u2029y":
                rebuilds_before_marks = panel._view.rebuilds
            for piece in (text[: len(text) // 2], text[len(text) // 2:]):  # each text arrives in two tokens
                turn.texts[index] = turn.texts.get(index, "") + piece
                panel._render()
                if str(panel.conversation.toHtml()) != whole_html(panel):
                    differing.append(repr(turn.texts[index]))
        assert differing == []
        # Until a paragraph mark came (after which the answer is rebuilt whole), lines were edited in place: the
        # whole HTML was set once, at the first redraw.
        assert rebuilds_before_marks == 1
        assert panel._view.rebuilds > 1
    finally:
        panel.close()
        app.processEvents()
