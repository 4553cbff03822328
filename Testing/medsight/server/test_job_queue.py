"""The job queue through a real server: hang-ups free the model, queued asks never starve health or cancel, the
bound gives 429, and `--timeout` counts running time only."""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import numpy as np
import pytest

from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server

NPY = {"content-type": "application/octet-stream"}
QUESTION = [{"role": "user", "content": "Please segment the white matter."}]
LONG = {"max_new_tokens": 2000, "repetition_penalty": 1.0}  # on the fixture's slice 1 the tiny model runs them all
#: Bounds are this fraction of a LONG job's own duration, measured on the same machine and load (about 1.2 s on an idle
#: 2-core machine, several times that under load), so a fast idle machine and a loaded one test the same thing.
FRACTION = 0.25


@pytest.fixture(scope="module")
def queue_server(engine):
    app = create_app(engine, model_name="tiny", max_waiting=45)
    with live_server(app) as url, httpx.Client(base_url=url) as c:
        image = np.random.default_rng(5).integers(0, 255, (3, 32, 32)).astype(np.uint8)
        r = c.post("/v1/volumes", content=npy(image), headers=NPY)
        yield url, app, r.json()["volume_id"]


@pytest.fixture(scope="module")
def long_job_s(queue_server) -> float:
    """How long the model takes for a LONG ask run to its end, here and now: the shorter of two runs (the first
    also warms the model up, which took it several times longer on a loaded machine)."""
    url, app, vid = queue_server
    durations = []
    with httpx.Client(base_url=url, timeout=300) as c:
        for _ in range(2):
            r = c.post("/v1/ask", json=ask_body(vid, LONG))
            [record] = [j for j in app.state.jobs.history if j.id == r.headers["x-job-id"]]
            assert record.stop_reason is None
            durations.append(record.finished - record.started)
    return min(durations)


def ask_body(vid: str, options: dict, stream: bool = False, index: int = 1) -> dict:
    return {"volume_id": vid, "slices": {"indices": [index]}, "messages": QUESTION, "options": options,
            "stream": stream}


def next_job_start_after(app, url: str, vid: str, hung_up: float) -> float:
    """Send a short ask and return how long after `hung_up` it started running (the model was free)."""
    jobs = app.state.jobs
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/ask", json=ask_body(vid, {"max_new_tokens": 1}, index=2))
    assert r.status_code == 200
    [record] = [j for j in jobs.history if j.id == r.headers["x-job-id"]]
    return record.started - hung_up


def test_closing_a_stream_frees_the_model_at_once(queue_server, long_job_s):
    url, app, vid = queue_server
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/ask", json=ask_body(vid, LONG, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break
            running = app.state.jobs.running
            assert running is not None  # mid-generation
        hung_up = time.monotonic()
    delay = next_job_start_after(app, url, vid, hung_up)
    print(f"stream hang-up -> next job started: {delay * 1000:.0f} ms (a LONG job: {long_job_s * 1000:.0f} ms)")
    assert running.stop_reason == "disconnected"  # stopped by the hang-up, not run to its LONG end
    assert delay < FRACTION * long_job_s, delay


def test_closing_a_plain_ask_frees_the_model_and_its_id_comes_first(queue_server, long_job_s):
    url, app, vid = queue_server
    with httpx.Client(base_url=url, timeout=60) as c:
        t0 = time.monotonic()
        with c.stream("POST", "/v1/ask", json=ask_body(vid, LONG)) as r:
            job_id = r.headers["x-job-id"]  # before any answer: the plain ask can be cancelled by id
            assert time.monotonic() - t0 < 5 and len(job_id) == 32
            while app.state.jobs.running is None or app.state.jobs.running.id != job_id:
                time.sleep(0.005)
            time.sleep(FRACTION * long_job_s / 2)  # let it generate
        hung_up = time.monotonic()
    delay = next_job_start_after(app, url, vid, hung_up)
    print(f"plain hang-up -> next job started: {delay * 1000:.0f} ms (a LONG job: {long_job_s * 1000:.0f} ms)")
    [record] = [j for j in app.state.jobs.history if j.id == job_id]
    assert record.stop_reason == "disconnected"  # stopped by the hang-up, not run to its LONG end
    assert delay < FRACTION * long_job_s, delay


def test_plain_ask_cancelled_by_its_header_id(queue_server):
    url, app, vid = queue_server
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/ask", json=ask_body(vid, LONG)) as r:
        job_id = r.headers["x-job-id"]
        while app.state.jobs.running is None:
            time.sleep(0.005)
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["cancelled"] is True
        r.read()
        body = r.json()
    assert body["job_id"] == job_id and body["cancelled"] is True


def test_45_queued_asks_leave_health_and_cancel_fast_and_more_get_429(queue_server):
    url, app, vid = queue_server
    jobs = app.state.jobs
    ids: list[str] = []
    lock = threading.Lock()
    release = threading.Event()

    def queued_ask(i: int) -> int:
        with httpx.Client(base_url=url, timeout=120) as c, c.stream(
                "POST", "/v1/ask", json=ask_body(vid, {"max_new_tokens": 1}, index=i % 3)) as r:
            if r.status_code != 200:
                return r.status_code
            with lock:
                ids.append(r.headers["x-job-id"])
            release.wait(120)
            r.read()
            return r.status_code

    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/ask", json=ask_body(vid, LONG)) as blocker:
        blocker_id = blocker.headers["x-job-id"]
        with ThreadPoolExecutor(45) as pool:
            futures = [pool.submit(queued_ask, i) for i in range(45)]
            deadline = time.monotonic() + 60
            while len(ids) < 45 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(ids) == 45 and jobs.waiting == 45
            refused = c.post("/v1/ask", json=ask_body(vid, {"max_new_tokens": 1}))  # one more than the bound
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert "45 asks are already waiting" in refused.json()["message"]
            latencies = {}
            for name, call in (("health", lambda: c.get("/v1/health")),
                               ("volume", lambda: c.get(f"/v1/volumes/{vid}")),
                               ("cancel", lambda: c.post(f"/v1/jobs/{ids[-1]}/cancel"))):
                t0 = time.monotonic()
                r = call()
                latencies[name] = time.monotonic() - t0
                assert r.status_code == 200, r.text
            print("with 45 queued:", {k: f"{v * 1000:.1f} ms" for k, v in latencies.items()})
            assert max(latencies.values()) < 0.2, latencies
            assert app.state.store._pins == {vid: 46}  # the running ask and the waiting ones; not the refused one
            assert c.post(f"/v1/jobs/{blocker_id}/cancel").json()["cancelled"] is True
            release.set()
            assert [f.result() for f in futures] == [200] * 45
        blocker.read()
    assert app.state.store._pins == {}


def test_asks_stopped_while_they_wait_leave_room_for_live_ones(engine):
    """Before the fix a waiting ask still filled its place in the queue once cancelled or hung up: with 2 places, two
    clients that cancelled made a live client's ask 429 "2 asks are already waiting; retry in about 15 s" until the
    running ask ended. Stopped asks are bounded too (they hold their requests until their turn): as many again."""
    waiting = 2
    app = create_app(engine, model_name="tiny", max_waiting=waiting)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        image = np.random.default_rng(5).integers(0, 255, (3, 32, 32)).astype(np.uint8)
        vid = c.post("/v1/volumes", content=npy(image), headers=NPY).json()["volume_id"]
        with c.stream("POST", "/v1/ask", json=ask_body(vid, LONG)) as blocker, ExitStack() as stack:
            def wait_then_cancel() -> httpx.Response:
                r = stack.enter_context(c.stream("POST", "/v1/ask", json=ask_body(vid, {"max_new_tokens": 1})))
                assert r.status_code == 200 and c.post(f"/v1/jobs/{r.headers['x-job-id']}/cancel").json()["cancelled"]
                return r

            stopped = [wait_then_cancel() for _ in range(2 * waiting)]  # each leaves its place to the next
            assert app.state.jobs.waiting == 0
            refused = c.post("/v1/ask", json=ask_body(vid, {"max_new_tokens": 1}))  # 2 x 2 stopped: the bound
            assert refused.status_code == 429 and f"{2 * waiting} asks are already waiting" in refused.text
            assert app.state.jobs.running.id == blocker.headers["x-job-id"]  # all of it happened behind the blocker
            c.post(f"/v1/jobs/{blocker.headers['x-job-id']}/cancel")
            for r in stopped:
                r.read()
                assert r.json()["cancelled"] is True
            blocker.read()
        r = c.post("/v1/ask", json=ask_body(vid, {"max_new_tokens": 1}))
        assert r.status_code == 200 and not r.json()["cancelled"]


def test_queue_wait_does_not_count_against_the_timeout(engine, long_job_s):
    # A limit the LONG job overruns and a 3-token ask keeps well within, on this machine as loaded now: the 1.5 s it
    # was once fixed at outlasted the whole LONG job (1.1 s) on an idle machine, so nothing was cut.
    limit = FRACTION * long_job_s / 2  # the 3-token ask still has 15x that on an idle machine
    app = create_app(engine, model_name="tiny", request_timeout_s=limit)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        image = np.random.default_rng(5).integers(0, 255, (3, 32, 32)).astype(np.uint8)  # queue_server's volume
        vid = c.post("/v1/volumes", content=npy(image), headers=NPY).json()["volume_id"]
        with c.stream("POST", "/v1/ask", json=ask_body(vid, LONG)) as first:
            while app.state.jobs.running is None:
                time.sleep(0.005)
            # Queued behind a job the timeout will cut: the second ask's own clock starts after that.
            t0 = time.monotonic()
            second = c.post("/v1/ask", json=ask_body(vid, {"max_new_tokens": 3}, index=0))
            waited = time.monotonic() - t0
            first.read()
        assert first.json()["cancelled"] is True  # the running job was cut by the timeout
        assert waited > 0.8 * limit  # it waited about the limit in the queue ...
        assert second.status_code == 200 and second.json()["cancelled"] is False  # ... and still had its own


def test_a_client_gone_after_its_text_stops_the_mask_decoding(queue_server, engine, monkeypatch):
    """Before the fix a hang-up after the text was complete left the worker decoding every region of the ask for
    nobody: 13 more perceiver batches of 14 here. Now the decoding stops before its next batch."""
    url, app, _ = queue_server
    volume = np.random.default_rng(8).integers(0, 255, (16, 48, 48)).astype(np.uint8)
    perceiver, decode = engine.model.region_perceiver, engine.model.region_perceiver.decode
    calls: list[int] = []
    decoding = threading.Event()

    def first_batch_waits_for_the_hang_up(*args, **kwargs):
        calls.append(1)
        if not decoding.is_set():
            decoding.set()
            job = app.state.jobs.running
            job.cancel.wait(60)  # until the handler sees the hang-up
        return decode(*args, **kwargs)

    with httpx.Client(base_url=url, timeout=60) as c:
        vid = c.post("/v1/volumes", content=npy(volume), headers=NPY).json()["volume_id"]
        body = {**ask_body(vid, {"max_new_tokens": 128, "repetition_penalty": 1.0}, stream=True),
                "slices": {"indices": list(range(len(volume)))}}
        monkeypatch.setattr(perceiver, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
        full = c.post("/v1/ask", json={**body, "stream": False}).json()
        batches = len(calls)
        assert batches > 1 and not full["cancelled"]

        calls.clear()
        monkeypatch.setattr(perceiver, "decode", first_batch_waits_for_the_hang_up)
        with c.stream("POST", "/v1/ask", json=body) as r:
            job_id = r.headers["x-job-id"]
            assert decoding.wait(60)  # the text is complete: hang up while the masks are decoded
    deadline = time.monotonic() + 60
    while not [j for j in app.state.jobs.history if j.id == job_id]:
        assert time.monotonic() < deadline, "the abandoned job never finished"
        time.sleep(0.01)
    [record] = [j for j in app.state.jobs.history if j.id == job_id]
    assert record.stop_reason == "disconnected"
    assert len(calls) == 1, f"{len(calls) - 1} perceiver batches of {batches} ran after the hang-up"


def test_retry_after_estimates_from_completed_asks_not_cancelled_ones(engine):
    """Before the fix every job's duration entered the mean behind Retry-After: asks cancelled while they waited end
    in milliseconds, and after a dozen of them the mean fell from 4.9 s to 0.4 s: a full queue (3 asks behind the
    running one) said "retry in 2 s" and took 8.6 s. Here each round fills the queue, is refused once and cancels
    every ask: the estimate must stay where the completed asks put it (before the fix it fell: 17, 8, 5, 3 s)."""
    waiting = 3
    app = create_app(engine, model_name="tiny", max_waiting=waiting)
    jobs = app.state.jobs
    work = {"max_new_tokens": 8}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        # Slice 1 of this image runs all of LONG's tokens (slice 0 ends after ~150): it holds the queue.
        image = np.random.default_rng(7).integers(0, 255, (2, 24, 24)).astype(np.uint8)
        vid = c.post("/v1/volumes", content=npy(image), headers=NPY).json()["volume_id"]
        for _ in range(2):
            assert c.post("/v1/ask", json=ask_body(vid, work, index=0)).status_code == 200

        def cancelled_while_waiting(ids: list[str]) -> bool:
            with httpx.Client(base_url=url, timeout=120) as own, own.stream(
                    "POST", "/v1/ask", json=ask_body(vid, work, index=0)) as r:
                ids.append(r.headers["x-job-id"])
                r.read()
                return r.json()["cancelled"]

        def full_queue_retry_after() -> int:
            """Fill the queue (a running ask, `waiting` behind it), read one refusal's Retry-After, cancel all."""
            with c.stream("POST", "/v1/ask", json=ask_body(vid, LONG, index=1)) as blocker, ThreadPoolExecutor(
                    waiting) as pool:
                ids = [blocker.headers["x-job-id"]]
                outcomes = [pool.submit(cancelled_while_waiting, ids) for _ in range(waiting)]
                while len(ids) <= waiting:
                    time.sleep(0.005)
                refused = c.post("/v1/ask", json=ask_body(vid, work))
                assert refused.status_code == 429, refused.text
                for job_id in ids[1:] + ids[:1]:
                    assert c.post(f"/v1/jobs/{job_id}/cancel").json()["cancelled"] is True
                assert [f.result() for f in outcomes] == [True] * waiting
                blocker.read()
            return int(refused.headers["retry-after"])

        estimates = [full_queue_retry_after() for _ in range(4)]
    assert len([j for j in jobs.history if j.stop_reason == "cancelled"]) == 4 * (waiting + 1)
    print(f"Retry-After with a full queue, after 0 to 12 cancelled asks: {estimates} s")
    assert estimates == [estimates[0]] * 4, estimates


@pytest.mark.parametrize("stream", [False, True])
def test_a_job_failing_after_its_client_left_logs_no_message(queue_server, engine, monkeypatch, caplog, stream):
    """Nobody read the exception of a job that failed after its client hung up, so asyncio logged it when the
    future was collected ("Future exception was never retrieved"), message and all: here the question, quoted by
    the failing step. The failure is logged by its type only (`run_job`), and asyncio logs nothing."""
    url, app, vid = queue_server
    question = "Is the DOE^JOHN liver lesion malignant?"

    def fails_after_the_hang_up(slices, messages, *args, cancel, **kwargs):
        cancel.wait(60)  # until the handler sees the hang-up
        raise RuntimeError(f"could not encode {messages[-1].content!r}")

    monkeypatch.setattr(engine, "ask", fails_after_the_hang_up)
    body = {**ask_body(vid, {"max_new_tokens": 1}, stream=stream),
            "messages": [{"role": "user", "content": question}]}
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/ask", json=body) as r:
            job_id = r.headers["x-job-id"]  # hang up at once
        deadline = time.monotonic() + 60
        while not [j for j in app.state.jobs.history if j.id == job_id]:
            assert time.monotonic() < deadline, "the abandoned job never finished"
            time.sleep(0.01)
        assert c.get("/v1/health").status_code == 200  # the event loop has settled the job's future since
    gc.collect()  # asyncio logs an unretrieved exception when its future is collected
    logged = "\n".join(caplog.text.splitlines())
    assert f"job {job_id} failed: RuntimeError" in logged, logged
    assert "never retrieved" not in logged and "DOE^JOHN" not in logged, logged[-2000:]
