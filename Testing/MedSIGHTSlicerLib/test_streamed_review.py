"""Streamed review: a 20-slice volume ask adds suggestions slice by slice while the live engine is still answering,
and the progress line shows slices done, total and time left."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer

from medsight_testing.chat import wait_until_answered
from medsight_testing.mrml import make_volume, oblique_matrix
from medsight_testing.review_scene import ct_voxels
from MedSIGHTSlicerLib import chat_panel
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData, chunk_bounds, progress_text, render_html
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.geometry import volume_upload_arrays
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.review import take_answers
from MedSIGHTSlicerLib.suggestions import SuggestionManager
from MedSIGHTSlicerLib.theme import colours_of

OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
SLICES = 20


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    application.processEvents()


def twenty_slices() -> np.ndarray:
    """The review scene's CT-like slices repeated to 20 (each slice keeps its own intensity offset)."""
    base = ct_voxels()
    reps = -(-SLICES // base.shape[0])
    stacked = np.concatenate([base + 2 * n for n in range(reps)])[:SLICES]
    return stacked.astype(np.int16)


@dataclass
class Asked:
    """What one whole-volume ask through the panel left: the scene's suggestions, and how the panel drew it."""

    scene: Any
    volume: Any
    array: Any
    spacing: Any
    origin: Any
    direction: Any
    manager: SuggestionManager
    timeline: list  # (time, slices answered, suggestions) at each arrival of streamed answers
    arrivals: list  # how many answers with regions each arrival brought
    statuses: list
    finished: float
    events: list  # the panel's events, in order: (kind, payload)
    set_html: int  # the conversation's whole HTML was set this often
    renders: int  # the conversation was redrawn this often
    shown: str  # the conversation's HTML at the end
    whole: str  # what setting the whole HTML at once makes of the same conversation


def count_set_html(panel: ChatPanel) -> list[int]:
    """Counts the panel's calls of its conversation's setHtml (a whole-HTML rebuild) in [0]."""
    calls = [0]
    set_html = panel.conversation.setHtml

    def counting(text: str) -> None:
        calls[0] += 1
        set_html(text)

    panel.conversation.setHtml = counting
    return calls


def whole_html(panel: ChatPanel) -> str:
    """What the panel's conversation document holds when its whole HTML is set at once."""
    browser = qt.QTextBrowser()
    browser.setHtml(render_html(panel._turns, colours_of(panel.conversation)))
    return str(browser.toHtml())


@pytest.fixture(scope="module")
def asked(app, url) -> Asked:
    """A 20-slice volume asked about through the chat panel, its answers taken into a SuggestionManager as they
    stream in (what the module does)."""
    scene = slicer.vtkMRMLScene()
    voxels = twenty_slices()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    array, spacing, origin, direction = volume_upload_arrays(volume)
    manager = SuggestionManager(scene, volume, model="tiny")

    panel = ChatPanel(MedSIGHTClient(url, timeout=60, retries=0))
    panel.options = dict(OPTIONS)
    panel.volume_provider = lambda: VolumeData(array, spacing, origin, direction, "CT", key="twenty")
    timeline, statuses, events, renders, arrivals = [], [], [], [0], []

    def on_region_answers(answers) -> None:
        take_answers(manager, answers, panel.ask_serial, panel.last_scope, panel.last_question)
        timeline.append((time.monotonic(), panel.answered_slices, len(manager.suggestion_ids())))
        arrivals.append(len(answers))

    handle, render = panel._handle, panel._render

    def recording(job, kind, payload) -> None:
        events.append((kind, list(payload)))
        handle(job, kind, payload)

    def counting_render() -> None:
        renders[0] += 1
        render()

    panel._handle, panel._render = recording, counting_render
    panel.on_region_answers = on_region_answers
    panel.set_scope("volume")
    set_html = count_set_html(panel)
    try:
        assert panel.send("Where is the liver?")
        wait_until_answered(app, panel, 120, lambda: statuses.append(panel.status.text()))
        finished = time.monotonic()
        assert panel.error.text() == ""
        assert panel.answered_slices == SLICES
        yield Asked(scene, volume, array, spacing, origin, direction, manager, timeline, arrivals, statuses, finished,
                    events,
                    set_html[0], renders[0], str(panel.conversation.toHtml()), whole_html(panel))
    finally:
        panel.close()
        app.processEvents()


def test_volume_ask_adds_suggestions_before_the_last_slice_is_answered(asked, url):
    timeline, statuses, manager = asked.timeline, asked.statuses, asked.manager
    first = next(entry for entry in timeline if entry[2] > 0)
    # The first suggestion is there while slices are still unanswered (after the first request's slices).
    assert first[1] <= chunk_bounds(SLICES)[0][1] < SLICES
    assert first[0] < timeline[-1][0] <= asked.finished
    # Progress shows slices done, total and time left while it runs.
    assert any("of 20 slices" in s and "left" in s for s in statuses), sorted(set(statuses))
    # A request's answers end together and were placed together (each finding grown once for them).
    with_regions = sum(1 for kind, payload in asked.events if kind == "answer" and payload[0].regions)
    assert sum(asked.arrivals) == with_regions and max(asked.arrivals) > 1
    scene, volume = asked.scene, asked.volume
    array, spacing, origin, direction = asked.array, asked.spacing, asked.origin, asked.direction

    # What streamed in is what the whole answer gives: each finding one 3D suggestion with the same voxels.
    client = MedSIGHTClient(url, timeout=60, retries=0)
    info = client.upload_volume(array, spacing, origin, direction, modality="CT")
    result = client.ask(info.volume_id, "Where is the liver?", indices=list(range(SLICES)), options=OPTIONS)
    at_end = SuggestionManager(scene, volume)
    at_end.add_answers([a for a in result.answers if a.regions], question="Where is the liver?")
    streamed = sorted(manager.suggestion_mask(s).tobytes() for s in manager.suggestion_ids())
    assert streamed == sorted(at_end.suggestion_mask(s).tobytes() for s in at_end.suggestion_ids())


def test_chunks_and_progress_text():
    assert chunk_bounds(20) == [(0, 1), (1, 3), (3, 7), (7, 15), (15, 20)]
    assert chunk_bounds(40)[-2:] == [(15, 31), (31, 40)]
    assert chunk_bounds(0) == []
    assert progress_text(5, 20, 10.0) == "Answered 5 of 20 slices, about 30 s left"
    assert progress_text(1, 200, 10.0) == "Answered 1 of 200 slices, about 33 min left"
    assert progress_text(20, 20, 10.0) == "Answered 20 of 20 slices"


def test_a_streamed_answer_edits_its_lines_and_ends_as_the_whole_html(asked):
    """The conversation's whole HTML was set once, when the question was sent, not again on each redraw (each cost
    the whole answer so far: 48 ms a redraw at 118 answered slices); what it shows at the end is what the whole HTML
    makes."""
    assert asked.set_html == 1 < asked.renders
    assert asked.shown == asked.whole


def test_each_streamed_event_leaves_the_document_the_whole_html_would_make(app, asked):
    """The ask's events replayed into a fresh panel redrawn after every one: after each, its document is what
    setting the whole HTML makes, and the whole HTML was set only when the question began."""
    panel = ChatPanel(None)
    try:
        set_html = count_set_html(panel)
        panel._turns.append(chat_panel._Turn("Where is the liver?", "whole volume", 1, "axial"))
        job = chat_panel._Job("Where is the liver?", ("volume", 0, 0), "axial", "id", "id", {})
        panel._job = job
        panel._render()
        replayed = [(kind, payload) for kind, payload in asked.events if kind != "finished"]
        for kind, payload in replayed:
            panel._handle(job, kind, payload)
            panel._render()
            assert str(panel.conversation.toHtml()) == whole_html(panel), (kind, payload)
        assert set_html[0] == 1 < len(replayed)
    finally:
        panel._job = None
        panel.close()
        app.processEvents()
