"""Uploads at once into a volume store that holds one volume: each upload's reply describes the volume it sent,
and the bytes of uploads in flight stay within the store's bound (more are told to retry, never a 5xx)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server

NPY = {"content-type": "application/octet-stream"}
UPLOADS = 8


def test_concurrent_uploads_evicting_each_other_all_get_201(engine):
    """Before the fix, the reply re-read the store after the upload: a concurrent upload had often evicted the
    volume meanwhile, and the upload answered 404 unknown_volume (6 of 8 uploads of 64 MiB)."""
    volumes = [np.full((8, 128, 128), i, np.float32) for i in range(UPLOADS)]
    size = volumes[0].nbytes
    app = create_app(engine, model_name="tiny", store_bytes=int(size * 1.5))  # one volume fits
    app.state.uploads.max_bytes = 2 * UPLOADS * size  # all at once (the bound on uploads in flight is tested below)
    with live_server(app) as url:
        def upload(volume: np.ndarray) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as c:
                return c.post("/v1/volumes", content=npy(volume), headers=NPY)

        with ThreadPoolExecutor(UPLOADS) as pool:
            replies = list(pool.map(upload, volumes))
    assert [r.status_code for r in replies] == [201] * UPLOADS, [r.text[:120] for r in replies]
    assert len({r.json()["volume_id"] for r in replies}) == UPLOADS
    assert all(r.json()["shape"] == list(volumes[0].shape) and r.json()["bytes"] == size for r in replies)


def _send_part(url: str, body: bytes, part: int) -> socket.socket:
    """Start an upload of `body` and send only its first `part` bytes (the rest stays in flight)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/volumes HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:part])
    return s


def test_uploads_in_flight_beyond_the_store_bound_get_429_with_retry_after(engine):
    """Before the fix every upload was buffered at once: 6 uploads of 64 MiB into a store bounded at 96 MiB took
    1.2 GiB more memory at their peak (3.5 times each body: the body, its growth, the hash's copy)."""
    first, second = (npy(np.full((8, 128, 128), i, np.float32)) for i in range(2))
    app = create_app(engine, model_name="tiny", store_bytes=int(len(first) * 1.5), read_grace_s=60)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        s = _send_part(url, first, len(first) // 2)
        try:
            deadline = time.monotonic() + 5
            while app.state.uploads.in_flight == 0 and time.monotonic() < deadline:  # the first header is read
                time.sleep(0.01)
            busy = c.post("/v1/volumes", content=second, headers=NPY)
            assert busy.status_code == 429 and busy.json()["code"] == "busy", busy.text
            assert app.state.uploads.in_flight == len(first)
            assert int(busy.headers["retry-after"]) >= 1 and "other uploads" in busy.json()["message"]

            s.sendall(first[len(first) // 2:])
            s.settimeout(30)
            assert s.recv(4096).startswith(b"HTTP/1.1 201")
        finally:
            s.close()
        assert app.state.uploads.in_flight == 0
        _send_part(url, second, len(second) // 2).close()  # a client gone mid-upload frees its share too
        time.sleep(0.5)
        assert app.state.uploads.in_flight == 0
        assert c.post("/v1/volumes", content=second, headers=NPY).status_code == 201
        assert app.state.uploads.in_flight == 0


def test_volumes_of_waiting_asks_stay_counted_and_uploads_beyond_them_get_429(engine):
    """Before the fix an upload evicted the volume of a waiting ask from the store, but the ask kept it alive: with
    asks waiting on evicted volumes, the volumes in memory grew past the store's bound without limit (here 3 volumes
    in a store of 2)."""
    volumes = [np.full((8, 128, 128), i, np.float32) for i in range(3)]
    size = volumes[0].nbytes
    app = create_app(engine, model_name="tiny", store_bytes=int(size * 2.5))  # two volumes fit
    question = [{"role": "user", "content": "Please segment the white matter."}]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        ids = [c.post("/v1/volumes", content=npy(v), headers=NPY).json()["volume_id"] for v in volumes[:2]]
        long = {"max_new_tokens": 2000, "repetition_penalty": 1.0}  # the tiny model rarely ends early
        with ThreadPoolExecutor(2) as pool:
            asks = [pool.submit(c.post, "/v1/ask", json={"volume_id": vid, "slices": {"indices": [0]},
                                                         "messages": question, "options": long}) for vid in ids]
            deadline = time.monotonic() + 30
            while app.state.jobs.running is None or app.state.jobs.waiting < 1:  # one runs, one waits
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = c.post("/v1/volumes", content=npy(volumes[2]), headers=NPY)
            assert busy.status_code == 429 and busy.json()["code"] == "busy", busy.text
            assert int(busy.headers["retry-after"]) >= 1 and "in use" in busy.json()["message"]
            assert [c.get(f"/v1/volumes/{vid}").status_code for vid in ids] == [200, 200]
            for job_id in list(app.state.jobs._jobs):
                c.post(f"/v1/jobs/{job_id}/cancel")
            assert [a.result().status_code for a in asks] == [200, 200]
        refused = c.post("/v1/ask", json={"volume_id": ids[0], "slices": {"indices": [99]}, "messages": question})
        assert refused.status_code == 422
        assert app.state.store._pins == {}  # every ask unpinned its volume: the one cancelled while waiting too
        assert c.post("/v1/volumes", content=npy(volumes[2]), headers=NPY).status_code == 201  # no longer in use
