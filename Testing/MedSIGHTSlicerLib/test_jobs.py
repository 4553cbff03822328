"""jobs.py: events from a worker thread, cancellation, error capture."""

from __future__ import annotations

import threading
import time

from MedSIGHTSlicerLib.jobs import JobRunner


def drain(runner: JobRunner, job_id: int, timeout: float = 5.0) -> list:
    """Poll like the GUI timer until the job's final event."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += [e for e in runner.poll() if e.job_id == job_id]
        if events and events[-1].final:
            return events
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} did not finish: {events}")


def test_progress_and_result_arrive_in_order():
    runner = JobRunner()
    main = threading.get_ident()

    def work(job):
        assert threading.get_ident() != main
        for n in range(3):
            job.emit(n)
        return "answer"

    job = runner.start(work)
    events = drain(runner, job.job_id)
    assert [e.kind for e in events] == ["started", "progress", "progress", "progress", "done"]
    assert [e.data for e in events[1:4]] == [0, 1, 2]
    assert events[-1].data == "answer"
    assert runner.wait(2) and not runner.busy


def test_cancel():
    runner = JobRunner()
    started = threading.Event()

    def work(job):
        started.set()
        while not job.cancel_event.wait(0.01):
            pass
        return "partial"

    job = runner.start(work)
    assert started.wait(2)
    runner.cancel(job.job_id)
    events = drain(runner, job.job_id)
    assert events[-1].kind == "cancelled" and events[-1].data == "partial"


def test_errors_become_events():
    runner = JobRunner()

    def work(job):
        job.emit("halfway")
        raise ConnectionError("engine at http://127.0.0.1:8000 refused")

    job = runner.start(work)
    events = drain(runner, job.job_id)
    assert events[-1].kind == "error"
    assert events[-1].message == "ConnectionError: engine at http://127.0.0.1:8000 refused"
    assert "Traceback" in events[-1].details
    assert runner.poll() == []


def test_concurrent_jobs_and_poll_limit():
    runner = JobRunner()
    jobs = [runner.start(lambda job, n=n: n * 10) for n in range(4)]
    assert runner.wait(2)
    first = runner.poll(limit=3)
    assert len(first) == 3
    rest = runner.poll()
    done = {e.job_id: e.data for e in first + rest if e.kind == "done"}
    assert done == {job.job_id: n * 10 for n, job in enumerate(jobs)}
    runner.cancel()  # nothing running: harmless
