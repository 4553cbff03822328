"""The engine's one job queue: a bound on waiting asks, one worker thread for the model, and cancel flags.

One device runs one batch at a time (the engine serialises asks anyway), so a single long-lived worker thread runs
every job: waiting asks hold no thread and no web-framework worker, the compute library keeps one thread team
(threads set once, in that worker), and memory is handed back to the system after each job. Results reach the
event loop with `loop.call_soon_threadsafe`, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("medsight.server")


class QueueFullError(Exception):
    """The queue holds its maximum of waiting jobs; `retry_after` is a guess in whole seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the engine is busy: {waiting} asks are already waiting; retry in about {retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass
class Job:
    """One ask. `work(job)` runs on the worker thread; its result (or exception) lands in `future`."""

    id: str
    work: Callable[[Job], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    #: Set when nobody will read the answer (the client went away, the server stops): the engine then skips the
    #: masks too, which a client that cancels and still waits gets (`Engine.ask`'s `abandon`).
    abandoned: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    #: Why the job was cut short, if it was: "cancelled" (by a client), "disconnected", "timeout".
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if reason == "disconnected":
            self.abandoned.set()
        self.cancel.set()


@dataclass(frozen=True)
class JobRecord:
    """What is kept of a finished job (timings and outcome, not its request or answer)."""

    id: str
    submitted: float
    started: float
    finished: float
    stop_reason: str | None


#: Below this many parameters a model's matrices are too small for intra-op threads to pay: their barriers cost
#: more than they save (tiny model, 2 loaded cores: 2 threads 7-11 s, 1 thread 0.5-0.8 s for the same ask).
SMALL_MODEL_PARAMETERS = 100_000_000


def default_compute_threads(parameters: int, device_type: str) -> int:
    """Compute threads for the engine's one worker: 1 on a GPU (the CPU only feeds it) or for a small model,
    else every core this process may use."""
    if device_type != "cpu" or parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def release_memory() -> None:
    """Give freed memory back: Python cycles, the CUDA caching allocator, and glibc's heap (malloc_trim)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency of the engine
        pass
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - only glibc has it (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


class JobQueue:
    """A bounded FIFO of jobs run one at a time by one worker thread.

    Args:
        max_waiting: jobs that may wait behind the running one; one more is refused with `QueueFullError`.
        threads: compute threads for the model (`torch.set_num_threads`), set once in the worker; None keeps
            the library's default.
        after_job: called on the worker after every job (default: `release_memory`).
    """

    def __init__(self, max_waiting: int = 64, threads: int | None = None,
                 after_job: Callable[[], None] | None = release_memory, remember: int = 1024) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self.threads = threads
        self._after_job = after_job
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}  # waiting and running
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()
        self._running: Job | None = None
        self.history: deque[JobRecord] = deque(maxlen=64)  # the latest finished jobs, for operators and tests
        self._mean_s = 5.0  # running mean of the durations of jobs that ran to their end, for Retry-After
        self._worker: threading.Thread | None = None

    # -- called from the event loop ------------------------------------------------------------------------------
    def submit(self, work: Callable[[Job], Any]) -> Job:
        """Queue `work`; raises `QueueFullError` when `max_waiting` jobs already wait."""
        loop = asyncio.get_running_loop()
        job = Job(uuid.uuid4().hex, work, loop.create_future(), loop)
        with self._lock:
            idle = self._running is None  # then one job may sit in the queue before the worker takes it
            waiting, queued = self._live_waiting(), len(self._jobs) - (not idle)
            if waiting >= self.max_waiting + idle:
                raise QueueFullError(waiting, self._retry_after())
            if queued >= 2 * self.max_waiting + idle:  # stopped ones hold their requests until their turn: a bound
                raise QueueFullError(queued, self._retry_after())
            self._jobs[job.id] = job
            self._ensure_worker()
        self._queue.put(job)
        return job

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool | None:
        """True if a waiting or running job was told to stop, False if it had finished, None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.stop(reason)
                return True
            return False if job_id in self._finished else None

    def retry_after(self) -> int:
        """Seconds until the jobs waiting now have probably run (for a Retry-After header)."""
        with self._lock:
            return self._retry_after()

    @property
    def waiting(self) -> int:
        """Jobs waiting that are still wanted (see `_live_waiting`)."""
        with self._lock:
            return self._live_waiting()

    @property
    def running(self) -> Job | None:
        return self._running

    def start(self) -> None:
        """Start the worker now (it also starts on the first job), so its one-time set-up is not in an ask."""
        with self._lock:
            self._ensure_worker()

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop the worker after the jobs already queued (used at shutdown), waiting up to `wait_s` for it to end.
        True when no worker runs any more."""
        self._queue.put(None)
        worker = self._worker
        if worker is not None and wait_s > 0:
            worker.join(wait_s)
        return worker is None or not worker.is_alive()

    # -- worker ------------------------------------------------------------------------------------------------------
    def _live_waiting(self) -> int:
        """Waiting jobs not told to stop. One stopped while it waits (cancelled, or its client gone) ends in
        milliseconds when its turn comes: counted, a few hung-up clients held the queue full (429) for live ones
        until the running job ended. Called with the lock held."""
        return sum(1 for job in self._jobs.values() if job is not self._running and not job.cancel.is_set())

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s * (self._live_waiting() + 1)))

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._serve, name="medsight-engine", daemon=True)
            self._worker.start()

    def _serve(self) -> None:
        # The model and libraries live as long as the process: moving them out of the collector's view once keeps
        # the per-job collection in `release_memory` at microseconds instead of a GIL-holding ~0.3 s pause.
        gc.collect()
        gc.freeze()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._running = job
            job.started = time.monotonic()
            try:
                outcome, value = "result", job.work(job)
            except BaseException as err:  # delivered to the awaiting handler, which turns it into a response
                outcome, value = "error", err
            job.finished = time.monotonic()
            with self._lock:
                self._running = None
                self._jobs.pop(job.id, None)
                self._finished[job.id] = None
                while len(self._finished) > self._remember:
                    self._finished.popitem(last=False)
                if outcome == "result" and job.stop_reason in (None, "timeout"):
                    # Only work that ran to its end (or to the time limit) says how long a waiting ask will take:
                    # a job cancelled or abandoned while it waited ends in milliseconds, and a dozen of them took
                    # the mean from 4.9 s to 0.4 s (a Retry-After of 2 s for a queue that took 8.6 s).
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (job.finished - job.started)
                self.history.append(JobRecord(job.id, job.submitted, job.started, job.finished, job.stop_reason))
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutdown)
                job.loop.call_soon_threadsafe(_settle, job.future, outcome, value)
            del job, value  # the worker must not keep the last result alive while it waits
            if self._after_job is not None:
                try:
                    self._after_job()
                except Exception as err:  # never let housekeeping stop the worker
                    log.warning("after-job cleanup failed: %s", type(err).__name__)


def _settle(future: asyncio.Future, outcome: str, value: Any) -> None:
    if future.done():  # the handler went away (client disconnected); nobody waits for the result
        return
    if outcome == "error":
        future.set_exception(value)
        # Marked as read: when the client has left nobody reads it, and asyncio would log it, message and all (it may
        # quote the question); `run_job` has logged the failure by its type.
        future.exception()
    else:
        future.set_result(value)
