"""Driving the chat panel in tests: wait for its question to end while Qt runs the panel's timer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until_answered(app: Any, panel: Any, timeout_s: float, each_round: Callable[[], None] | None = None,
                        pause_s: float = 0.005) -> None:
    """Process Qt events until ``panel`` is no longer busy; the test fails after ``timeout_s``. ``each_round`` runs
    after each round of events (to record what the panel or the review list shows meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while panel.busy:
        assert time.monotonic() < deadline, "the question did not finish"
        app.processEvents()
        if each_round is not None:
            each_round()
        time.sleep(pause_s)
