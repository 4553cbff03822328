"""Streamed review: a 20-slice volume ask adds suggestions slice by slice while the live engine is still answering,
and the progress line shows slices done, total and time left."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
import time

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer

from medsight_testing.chat import wait_until_answered
from medsight_testing.mrml import make_volume, oblique_matrix
from medsight_testing.review_scene import ct_voxels
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData, chunk_bounds, progress_text
from MedSIGHTSlicerLib.client import MedSIGHTClient
from MedSIGHTSlicerLib.geometry import volume_upload_arrays
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.review import take_answer
from MedSIGHTSlicerLib.suggestions import SuggestionManager

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


def test_volume_ask_adds_suggestions_before_the_last_slice_is_answered(app, url):
    scene = slicer.vtkMRMLScene()
    voxels = twenty_slices()
    volume = make_volume(scene, voxels, oblique_matrix(), name="CT")
    array, spacing, origin, direction = volume_upload_arrays(volume)
    manager = SuggestionManager(scene, volume, model="tiny")

    panel = ChatPanel(MedSIGHTClient(url, timeout=60, retries=0))
    panel.options = dict(OPTIONS)
    panel.volume_provider = lambda: VolumeData(array, spacing, origin, direction, "CT", key="twenty")
    timeline = []  # (time, slices answered, suggestions) at each streamed answer
    statuses = []

    def on_regions(answer) -> None:
        take_answer(manager, answer, panel.ask_serial, panel.last_scope, panel.last_question)
        timeline.append((time.monotonic(), panel.answered_slices, len(manager.suggestion_ids())))

    panel.on_regions = on_regions
    panel.set_scope("volume")
    try:
        assert panel.send("Where is the liver?")
        wait_until_answered(app, panel, 120, lambda: statuses.append(panel.status.text()))
        finished = time.monotonic()
        assert panel.error.text() == ""
        assert panel.answered_slices == SLICES
        first = next(entry for entry in timeline if entry[2] > 0)
        # The first suggestion is there while slices are still unanswered (after the first request's slices).
        assert first[1] <= chunk_bounds(SLICES)[0][1] < SLICES
        assert first[0] < timeline[-1][0] <= finished
        # Progress shows slices done, total and time left while it runs.
        assert any("of 20 slices" in s and "left" in s for s in statuses), sorted(set(statuses))
    finally:
        panel.close()
        app.processEvents()

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
