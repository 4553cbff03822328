"""One question from the Slicer panel to the mask and back, traced: every file of ours whose code runs on the way
(the module's Lib, the engine's server, engine and model) is named in docs/ARCHITECTURE.md's walk-through, so the
page stays a true map of the path. The count is printed (run with -s) and reported in the architecture page."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

import slicer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))

from medsight_testing.chat import wait_until_answered  # noqa: E402
from medsight_testing.live_server import live_server  # noqa: E402
from medsight_testing.mrml import make_volume, oblique_matrix  # noqa: E402
from medsight_testing.review_scene import ct_voxels  # noqa: E402
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData  # noqa: E402
from MedSIGHTSlicerLib.client import MedSIGHTClient  # noqa: E402
from MedSIGHTSlicerLib.geometry import volume_upload_arrays  # noqa: E402
from MedSIGHTSlicerLib.qt_shim import qt  # noqa: E402
from MedSIGHTSlicerLib.review import take_answers  # noqa: E402
from MedSIGHTSlicerLib.suggestions import SuggestionManager  # noqa: E402

ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}


def _roots() -> list[Path]:
    """The source folders whose files the architecture page names by their path below the folder."""
    import medsight

    return [Path(medsight.__file__).resolve().parent, REPO / "MedSIGHTSlicer" / "MedSIGHTSlicerLib"]


def _walkthrough() -> str:
    text = ARCHITECTURE.read_text()
    start = text.index("## One question, end to end")
    return text[start : text.index("\n## ", start + 1)]


def traced_question() -> tuple[set[str], int]:
    """The files of ours that run while one volume question is asked in the panel and its masks become suggested
    segments, as ``medsight/...`` or ``MedSIGHTSlicerLib/...`` paths; and the number of suggestions."""
    prefixes = {str(root) + os.sep: root.name for root in _roots()}  # folder path -> package folder name
    seen: set[str] = set()
    tracing = threading.Event()

    def trace(frame, event, arg):
        # Called once per Python call; returning None keeps line tracing off, so the question runs near full speed.
        if tracing.is_set():
            seen.add(frame.f_code.co_filename)

    import medsight
    import medsight.server.app

    # Hooks go in before the engine's worker and the server's threads start, so their calls are seen too.
    sys.settrace(trace)
    threading.settrace(trace)
    try:
        app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
        engine = medsight.Engine.load("tiny", device="cpu")
        with live_server(medsight.server.app.create_app(engine)) as url:
            scene = slicer.vtkMRMLScene()
            volume = make_volume(scene, ct_voxels().astype(np.int16), oblique_matrix(), name="CT")
            array, spacing, origin, direction = volume_upload_arrays(volume)
            manager = SuggestionManager(scene, volume, model="tiny")
            panel = ChatPanel(MedSIGHTClient(url, timeout=60, retries=0))
            panel.options = dict(OPTIONS)
            panel.volume_provider = lambda: VolumeData(array, spacing, origin, direction, "CT", key="question-path")
            panel.on_region_answers = lambda answers: take_answers(manager, answers, panel.ask_serial,
                                                                   panel.last_scope, panel.last_question)
            panel.set_scope("volume")
            tracing.set()
            try:
                assert panel.send("Where is the liver?")
                wait_until_answered(app, panel, 300)
            finally:
                tracing.clear()
                panel.close()
                app.processEvents()
            assert panel.error.text() == ""
            suggestions = len(manager.suggestion_ids())
    finally:
        sys.settrace(None)
        threading.settrace(None)
    files = {f"{package}/{Path(name[len(prefix):]).as_posix()}"
             for name in seen for prefix, package in prefixes.items() if name.startswith(prefix)}
    return files, suggestions


def test_the_architecture_page_names_every_file_one_question_runs():
    files, suggestions = traced_question()
    assert suggestions > 0, "the question gave no suggested segment, so its masks did not come back"
    walkthrough = _walkthrough()
    # The page names a file by its path in the package, with or without the package folder.
    named = set(re.findall(r"`([\w/]+\.py)", walkthrough))
    missing = sorted(f for f in files if f not in named and f.split("/", 1)[1] not in named)
    print(f"\none question ran code in {len(files)} of our files: {sorted(files)}")
    assert not missing, f"docs/ARCHITECTURE.md's walk-through does not name {missing}"
    # The page also says how many files that is: checked here, so the number cannot go stale.
    stated = re.search(r"Today that is (\d+) files, (\d+) in the module and (\d+) in the engine", " ".join(
        walkthrough.split()))
    assert stated, "docs/ARCHITECTURE.md's walk-through no longer says how many files one question runs"
    module = sum(1 for f in files if f.startswith("MedSIGHTSlicerLib/"))
    assert tuple(map(int, stated.groups())) == (len(files), module, len(files) - module), (
        f"docs/ARCHITECTURE.md says {stated.group(0)!r}; one question ran {len(files)} files, {module} in the module")
