"""The chat panel drawing a streamed whole-volume answer, old vs new side by side (not a test).

Usage: python benchmarks/slicer_chat_stream.py [--slices 60] [--old b9a4759]

A whole-volume question about ``--slices`` CT-like slices is asked once through the panel of the working tree, of the
tiny random-weight engine served on loopback, and the panel's events (tokens, regions, answers) are recorded. They
are then replayed into a fresh panel of each version, which is redrawn after every event (the most a poll can bring:
one event per tick), on Slicer's main thread as in the module. "old" is chat_panel.py at the git revision ``--old``.
Printed: each version's main-thread time in all, per event over the first and last tenth of the events, the ratio,
how often the whole HTML was set, and whether both ended showing the same document.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "support"))  # the test helpers are not an installed package
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))

from slicer_answer_placement import module_at  # noqa: E402  (this folder: the script's own)

from medsight_testing.chat import wait_until_answered  # noqa: E402
from medsight_testing.review_scene import ct_voxels  # noqa: E402
from MedSIGHTSlicerLib import chat_panel  # noqa: E402
from MedSIGHTSlicerLib.client import MedSIGHTClient  # noqa: E402
from MedSIGHTSlicerLib.qt_shim import qt  # noqa: E402

SOURCE = "MedSIGHTSlicer/MedSIGHTSlicerLib/chat_panel.py"
QUESTION = "Where is the liver?"
# PySide6 6.12 under CPython 3.11 drops a reference to None on each call of a Qt method returning void; a long replay
# makes enough of them to exhaust None's count (Python then aborts). These references keep it above zero.
_NONE_REFERENCES = [None] * 1_000_000


def record(app, slices: int) -> list:
    """The events of one whole-volume question about ``slices`` slices, from the live tiny engine."""
    import medsight
    import medsight.server.app
    from medsight_testing.live_server import live_server

    base = ct_voxels()
    voxels = np.concatenate([base + 2 * n for n in range(-(-slices // base.shape[0]))])[:slices].astype(np.int16)
    engine = medsight.Engine.load("tiny", device="cpu")
    with live_server(medsight.server.app.create_app(engine)) as url:
        panel = chat_panel.ChatPanel(MedSIGHTClient(url, timeout=120, retries=0))
        panel.options = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
        panel.volume_provider = lambda: chat_panel.VolumeData(voxels, key="ct")
        events, handle = [], panel._handle

        def recording(job, kind, payload) -> None:
            events.append((kind, list(payload)))
            handle(job, kind, payload)

        panel._handle = recording
        panel.set_scope("volume")
        panel.send(QUESTION)
        wait_until_answered(app, panel, 3600)
        if panel.error.text():
            raise SystemExit(f"the question failed: {panel.error.text()}")
        panel.close()
    return [(kind, payload) for kind, payload in events if kind != "finished"]


def replay(module, events: list) -> tuple[list[float], int, str]:
    """Seconds per event (handled and redrawn), how often the whole HTML was set, and the final document's HTML."""
    panel = module.ChatPanel(None)
    set_html, calls = panel.conversation.setHtml, [0]

    def counting(text: str) -> None:
        calls[0] += 1
        set_html(text)

    panel.conversation.setHtml = counting
    panel._turns.append(module._Turn(QUESTION, "whole volume", 1, "axial"))
    job = module._Job(QUESTION, ("volume", 0, 0), "axial", "id", "id", {})
    panel._job = job
    panel._render()
    seconds = []
    for kind, payload in events:
        start = time.perf_counter()
        panel._handle(job, kind, payload)
        if panel._dirty:
            panel._render()
        seconds.append(time.perf_counter() - start)
    shown = str(panel.conversation.toHtml())
    panel._job = None
    panel.close()
    return seconds, calls[0], shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--old", default="b9a4759", help="git revision of the old chat_panel.py")
    args = parser.parse_args()
    app = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    events = record(app, args.slices)
    results = {"old": replay(module_at(args.old, SOURCE), events), "new": replay(chat_panel, events)}
    tenth = max(len(events) // 10, 1)
    print(f"{args.slices} slices answered, {len(events)} events, each redrawn at once "
          f"(per event: first / last {tenth} events)")
    for name, (seconds, rebuilds, _) in results.items():
        label = args.old if name == "old" else "working tree"
        print(f"  {name} ({label}): {sum(seconds):.2f} s, {1000 * np.mean(seconds[:tenth]):.2f} / "
              f"{1000 * np.mean(seconds[-tenth:]):.2f} ms per event, whole HTML set {rebuilds} times")
    old, new = results["old"][0], results["new"][0]
    print(f"  old/new {sum(old) / sum(new):.1f}x in all, {np.mean(old[-tenth:]) / np.mean(new[-tenth:]):.1f}x per "
          f"event at the end")
    print(f"  same final document: {results['old'][2] == results['new'][2]}")
    sys.stdout.flush()
    os._exit(0)  # Python's own exit would give back _NONE_REFERENCES' references to a count the binding lowered


if __name__ == "__main__":
    main()
