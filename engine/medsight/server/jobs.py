"""Running asks: a cancel flag per job, so that `POST /v1/jobs/{id}/cancel` can stop one between tokens."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict


class JobRegistry:
    """Cancel events of running jobs, plus a short memory of finished ones (cancelling those is a no-op)."""

    def __init__(self, remember: int = 1024) -> None:
        self._running: dict[str, threading.Event] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def start(self) -> tuple[str, threading.Event]:
        job_id = uuid.uuid4().hex
        event = threading.Event()
        with self._lock:
            self._running[job_id] = event
        return job_id, event

    def finish(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            self._finished[job_id] = None
            while len(self._finished) > self._remember:
                self._finished.popitem(last=False)

    def cancel(self, job_id: str) -> bool | None:
        """True if a running job was told to stop, False if it had already finished, None if unknown."""
        with self._lock:
            event = self._running.get(job_id)
            if event is not None:
                event.set()
                return True
            return False if job_id in self._finished else None
