"""A background job runner without Qt: work runs in a thread, the GUI polls events on the main thread.

Slicer's GUI and MRML must only be touched from the main thread, so the worker never calls back into them. It
puts events on a thread-safe queue; the chat panel drains it from a ``QTimer`` with ``poll()``. Exceptions in the
job become an "error" event (with the message and traceback), never a silent dead thread.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "JobEvent", "JobRunner"]


@dataclass(frozen=True)
class JobEvent:
    """Something that happened in a job.

    ``kind`` is "started", "progress" (``data`` = what the job emitted), "done" (``data`` = return value),
    "cancelled", or "error" (``message``, ``details`` = traceback).
    """

    job_id: int
    kind: str
    data: Any = None
    message: str = ""
    details: str = field(default="", repr=False)

    @property
    def final(self) -> bool:
        return self.kind in ("done", "cancelled", "error")


class Job:
    """What a running job gets: ``emit(data)`` to report progress, ``cancelled`` / ``cancel_event`` to stop."""

    def __init__(self, job_id: int, events: queue.Queue) -> None:
        self.job_id = job_id
        self.cancel_event = threading.Event()
        self._events = events
        self.thread: threading.Thread | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def emit(self, data: Any) -> None:
        """Report progress (any object; it reaches the main thread as a "progress" event)."""
        self._events.put(JobEvent(self.job_id, "progress", data))

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class JobRunner:
    """Starts jobs in daemon threads and collects their events.

    Example::

        runner = JobRunner()
        job = runner.start(lambda job: client.ask(...))
        # on a QTimer: for event in runner.poll(): ...
    """

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def start(self, func: Callable[[Job], Any], name: str = "MedSIGHT job") -> Job:
        """Run ``func(job)`` in a worker thread; its return value arrives as the "done" event's data."""
        with self._lock:
            job = Job(self._next_id, self._events)
            self._next_id += 1
            self._jobs[job.job_id] = job
        # Daemon: a stuck network call must not keep Slicer from quitting.
        job.thread = threading.Thread(target=self._run, args=(job, func), name=f"{name} {job.job_id}", daemon=True)
        self._events.put(JobEvent(job.job_id, "started"))
        job.thread.start()
        return job

    def _run(self, job: Job, func: Callable[[Job], Any]) -> None:
        try:
            result = func(job)
        except BaseException as err:  # every failure, even SystemExit, must reach the GUI
            details = traceback.format_exc()
            message = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            self._events.put(JobEvent(job.job_id, "error", message=message, details=details))
        else:
            kind = "cancelled" if job.cancelled else "done"
            self._events.put(JobEvent(job.job_id, kind, result))
        finally:
            with self._lock:
                self._jobs.pop(job.job_id, None)

    def poll(self, limit: int | None = None) -> list[JobEvent]:
        """The events so far (at most ``limit``), without blocking. Call from the main thread."""
        out: list[JobEvent] = []
        while limit is None or len(out) < limit:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                break
        return out

    def cancel(self, job_id: int | None = None) -> None:
        """Ask one job (or all) to stop; the job decides when (it checks ``job.cancelled``)."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if job_id is None or j.job_id == job_id]
        for job in jobs:
            job.cancel()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._jobs)

    def wait(self, timeout: float | None = None) -> bool:
        """Join all running jobs (tests, shutdown). True when none is left running."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout)
        return not any(job.running for job in jobs)
