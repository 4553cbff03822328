"""End to end through a real HTTP server on a loopback port with the tiny model."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from medsight.engine import VolumeSlices
from medsight.imaging import Volume
from medsight.model.generation import GenerationOptions
from medsight.prompt import Message
from medsight.server.app import create_app
from medsight.server.rle import encode_mask
from medsight.server.security import check_bind
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server
from MedSIGHTSlicerLib.rle import decode_mask  # the client's decoder: what the server sends must decode there

NPY = {"content-type": "application/octet-stream"}
QUESTION = [{"role": "user", "content": "Please segment the white matter."}]


def sse_events(response: httpx.Response):
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: "):])


def upload(client: httpx.Client, body: bytes, params: dict) -> str:
    r = client.post("/v1/volumes", content=body, params=params, headers={"content-type": "application/x-npy"})
    assert r.status_code == 201, r.text
    return r.json()["volume_id"]


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 9), (64, 80)]:
        mask = rng.random(shape) > 0.5
        assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    full = np.ones((3, 4), bool)
    assert encode_mask(full)["counts"] == [0, 12]


def test_a_stored_volume_holds_no_more_memory_than_its_upload(engine):
    """The store bounds its volumes by their arrays' bytes, and each array is read in place from its upload's body:
    that body, grown chunk by chunk as it arrived, kept up to an eighth more than the volume (1.125 times a 16-slice
    one), memory outside the bound. Each stored array is the volume sent, in a buffer of the body's size."""
    import sys

    app = create_app(engine, model_name="tiny")
    volumes = [np.random.default_rng(k).integers(-1000, 1000, (k, 256, 256), dtype=np.int16) for k in (8, 16, 33, 64)]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        ids = [upload(c, npy(volume), {}) for volume in volumes]
    for volume_id, volume in zip(ids, volumes, strict=True):
        stored = app.state.store.get(volume_id).array
        np.testing.assert_array_equal(stored, volume)
        buffer = stored
        while isinstance(buffer, memoryview) or (isinstance(buffer, np.ndarray) and buffer.base is not None):
            buffer = buffer.obj if isinstance(buffer, memoryview) else buffer.base  # to what owns the bytes
        if isinstance(buffer, np.ndarray):
            assert buffer.nbytes <= len(npy(volume))
        else:
            assert sys.getsizeof(buffer) - sys.getsizeof(bytearray()) <= len(npy(volume)) + 1  # bytearray's NUL


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory as Linux reports it")
def test_an_upload_takes_its_memory_as_its_voxels_arrive(engine):
    """Before the fix the buffer of an upload's declared size was zeroed whole on the event loop as soon as its
    .npy header arrived (`bytearray(size)`): 446-527 ms for a 512 MiB volume, every other client waiting. Now its
    pages are taken as the voxels arrive: the header and first chunk of a 256 MiB upload add a small part of that to
    the engine's memory."""
    import io
    import socket

    app = create_app(engine, model_name="tiny")
    shape, chunk = (256, 512, 512), 64 * 1024
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    total = len(header.getvalue()) + int(np.prod(shape)) * 4
    with live_server(app) as url, httpx.Client(base_url=url) as c:
        host, port = url.removeprefix("http://").split(":")
        before = _resident_bytes()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v1/volumes HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {total}\r\n\r\n".encode() + header.getvalue() + bytes(chunk))
            deadline = time.monotonic() + 60
            while app.state.uploads.in_flight != total and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.uploads.in_flight == total  # the header was read and the buffer made
            assert c.get("/v1/health").status_code == 200  # the event loop has finished that step
            grown = _resident_bytes() - before
    assert grown < total / 8, (grown, total)


def test_health_model_card_and_openapi(server):
    with httpx.Client(base_url=server) as c:
        assert c.get("/v1/health").json()["status"] == "ok"
        card = c.get("/v1/model").json()
        assert card["random_weights"] and card["mask_size"] == 32 and card["num_region_codes"] == 576
        assert "/v1/ask" in c.get("/openapi.json").json()["paths"]


def test_the_readme_lists_exactly_the_api_the_engine_serves(server):
    """The README's "The API (`/v1`)" paragraph names each endpoint as `METHOD path`: the same set the app publishes."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    listed = " ".join(readme[readme.index("The API (`/v1`)") :].split("\n\n")[0].split())
    def route(method: str, path: str) -> tuple[str, str]:
        return method.upper(), re.sub(r"\{\w+\}", "{}", path.removeprefix("/v1/"))  # "{id}" names "{volume_id}"

    named = {route(*found) for found in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) ([a-z_{}/]+)`", listed)}
    with httpx.Client(base_url=server) as c:
        paths = c.get("/openapi.json").json()["paths"]
    served = {route(method, path) for path, ops in paths.items() for method in ops}
    assert named == served, f"README only: {sorted(named - served)}; engine only: {sorted(served - named)}"


def test_stream_three_slices_of_a_real_volume(server, mni, mni_upload):
    data = mni[0]
    with httpx.Client(base_url=server, timeout=60) as c:
        vid = upload(c, *mni_upload)
        info = c.get(f"/v1/volumes/{vid}").json()
        assert info["shape"] == list(data.shape) and info["modality"] == "MR"
        request = {"volume_id": vid, "slices": {"plane": "axial", "indices": [30, 40, 50]}, "messages": QUESTION,
                   "options": {"max_new_tokens": 12}, "stream": True}
        kinds, regions, done = [], [], None
        with c.stream("POST", "/v1/ask", json=request) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for kind, payload in sse_events(r):
                kinds.append(kind)
                if kind == "region":
                    regions.append(payload)
                if kind == "done":
                    done = payload
    assert kinds[0] == "job" and "token" in kinds and kinds[-1] == "done"
    assert kinds.index("token") < kinds.index("region") if regions else True
    assert len(done["answers"]) == 3
    for answer in done["answers"]:
        rows_cols = [data.shape[1], data.shape[2]]  # axial slices of a (k, j, i) volume are j x i
        for region in answer["regions"]:
            assert region["mask"]["shape"] == rows_cols
            assert decode_mask(region["mask"]).shape == tuple(rows_cols)
        assert np.asarray(answer["slice_to_ras"]).shape == (4, 4)
    assert len(regions) == sum(len(a["regions"]) for a in done["answers"])
    assert all(event["region"]["mask"] is None for event in regions), "each mask is sent once, in done"


def test_batched_answers_equal_one_by_one(server, mni_upload):
    with httpx.Client(base_url=server, timeout=60) as c:
        vid = upload(c, *mni_upload)
        ask = {"volume_id": vid, "messages": QUESTION, "options": {"max_new_tokens": 8}}
        batched = c.post("/v1/ask", json={**ask, "slices": {"indices": [35, 45]}}).json()["answers"]
        for i, index in enumerate([35, 45]):
            single = c.post("/v1/ask", json={**ask, "slices": {"indices": [index]}}).json()["answers"][0]
            assert single["text"] == batched[i]["text"]
            assert [r["mask"] for r in single["regions"]] == [r["mask"] for r in batched[i]["regions"]]


def test_cancel_mid_stream_stops_generation(server, mni_upload):
    with httpx.Client(base_url=server, timeout=120) as c:
        vid = upload(c, *mni_upload)
        base = {"volume_id": vid, "slices": {"indices": [40]}, "messages": QUESTION,
                "options": {"max_new_tokens": 400, "repetition_penalty": 1.0}}
        t0 = time.monotonic()
        full = c.post("/v1/ask", json=base).json()
        full_time = time.monotonic() - t0
        job_id, tokens, done = None, 0, None
        t0 = time.monotonic()
        with c.stream("POST", "/v1/ask", json={**base, "stream": True}) as r:
            for kind, payload in sse_events(r):
                if kind == "job":
                    job_id = payload["job_id"]
                elif kind == "token":
                    tokens += 1
                    if tokens == 2:
                        assert c.post(f"/v1/jobs/{job_id}/cancel").json() == {"job_id": job_id, "cancelled": True}
                elif kind == "done":
                    done = payload
        cancelled_time = time.monotonic() - t0
    assert done["cancelled"] and done["answers"][0]["cancelled"]
    assert len(done["answers"][0]["text"]) < len(full["answers"][0]["text"])
    assert cancelled_time < full_time, (cancelled_time, full_time)
    with httpx.Client(base_url=server) as c:  # the job is over: cancelling again is a no-op, unknown ids 404
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["cancelled"] is False
        assert c.post("/v1/jobs/nope/cancel").status_code == 404


def test_concurrent_clients_get_their_own_masks(server, engine):
    """16 clients x 20 questions on different images; each answer must match the engine run on that image."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (24, 20), dtype=np.uint8) for _ in range(16)]
    with httpx.Client(base_url=server, timeout=60) as c:
        ids = [upload(c, npy(im), {"modality": "OT"}) for im in images]
    options = {"max_new_tokens": 3}

    def client(i: int) -> list[dict]:
        with httpx.Client(base_url=server, timeout=120) as c:
            out = []
            for _ in range(20):
                r = c.post("/v1/ask", json={"volume_id": ids[i], "messages": QUESTION, "options": options})
                assert r.status_code == 200, r.text
                out.append(r.json()["answers"][0])
            return out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    for i, answers in enumerate(results):
        # Expected: the engine itself, asked directly about the same image.
        volume = Volume(images[i][None], modality="OT")
        expected = engine.ask(VolumeSlices(volume, "axial", [0]), [Message("user", QUESTION[0]["content"])],
                              GenerationOptions(max_new_tokens=3))[0]
        want = [encode_mask(r.mask) for r in expected.regions]
        for got in answers:
            assert got["text"] == expected.text
            assert [r["mask"] for r in got["regions"]] == want


def test_errors_are_json_and_the_server_recovers(engine, mni_upload):
    with live_server(create_app(engine, token="s3cret", max_upload_bytes=100_000, model_name="tiny")) as url:
        auth = {"authorization": "Bearer s3cret"}
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.get("/v1/health")
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert c.get("/v1/health", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/health", headers=auth).status_code == 200
            good = npy(np.zeros((2, 30, 30), np.float32))

            def ok() -> str:
                return c.post("/v1/volumes", content=good, headers={**auth, **NPY}).json()["volume_id"]

            r = c.post("/v1/volumes", content=mni_upload[0], headers={**auth, **NPY})
            assert r.status_code == 413 and "exceeds the limit" in r.json()["message"]
            vid = ok()
            infinite = np.zeros((2, 30, 30), np.float32)
            infinite[0, 1, 2] = np.inf
            r = c.post("/v1/volumes", content=npy(infinite), headers={**auth, **NPY})
            assert r.status_code == 422 and "1 infinite" in r.json()["message"]
            assert ok() == vid
            r = c.post("/v1/ask", json={"volume_id": "0" * 64, "messages": QUESTION}, headers=auth)
            assert r.status_code == 422 and r.json()["code"] == "unknown_volume"
            r = c.post("/v1/ask", content=b"{not json", headers={**auth, "content-type": "application/json"})
            assert r.status_code == 422 and r.json()["code"] == "invalid_request"
            r = c.post("/v1/ask", json={"volume_id": vid, "messages": []}, headers=auth)
            assert r.status_code == 422 and "messages" in r.json()["message"]
            r = c.post("/v1/ask", json={"volume_id": vid, "slices": {"indices": [5]}, "messages": QUESTION},
                       headers=auth)
            assert r.status_code == 422 and "slice index 5" in r.json()["message"]
            r = c.post("/v1/volumes", content=b"garbage", headers={**auth, **NPY})
            assert r.status_code == 422 and ".npy" in r.json()["message"]
            r = c.post("/v1/ask", json={"volume_id": vid, "messages": QUESTION, "options": {"max_new_tokens": 2}},
                       headers=auth)
            assert r.status_code == 200 and len(r.json()["answers"]) == 1


def test_a_token_guards_the_api_description_too(engine):
    """Before the fix /docs, /redoc and /openapi.json answered 200 without the token of an engine that has one."""
    with live_server(create_app(engine, token="s3cret", model_name="tiny")) as url, httpx.Client(base_url=url) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/health"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", path
            assert c.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200, path
        assert "/v1/ask" in c.get("/openapi.json", headers={"authorization": "Bearer s3cret"}).json()["paths"]


def test_the_token_after_several_spaces_is_taken_over_http(engine):
    """RFC 9110 allows one or more spaces after the scheme (before the fix: 401); a tab is not a separator there."""
    with live_server(create_app(engine, token="s3cret", model_name="tiny")) as url, httpx.Client(base_url=url) as c:
        assert c.get("/v1/health", headers={"authorization": "Bearer   s3cret"}).status_code == 200
        assert c.get("/v1/health", headers={"authorization": "Bearer\ts3cret"}).status_code == 401


def test_non_loopback_bind_needs_a_token():
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0 without a token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "token")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)


def test_client_disconnect_cancels_the_job(server, mni_upload):
    with httpx.Client(base_url=server, timeout=60) as c:
        vid = upload(c, *mni_upload)
        request = {"volume_id": vid, "slices": {"indices": [40]}, "messages": QUESTION,
                   "options": {"max_new_tokens": 2000, "repetition_penalty": 1.0}, "stream": True}
        with c.stream("POST", "/v1/ask", json=request) as r:
            for kind, _ in sse_events(r):
                if kind == "token":
                    break  # hang up
        # The engine is free again quickly (its lock is released once the job notices the disconnect).
        t0 = time.monotonic()
        r = c.post("/v1/ask", json={"volume_id": vid, "slices": {"indices": [40]}, "messages": QUESTION,
                                    "options": {"max_new_tokens": 2}})
        assert r.status_code == 200
        assert time.monotonic() - t0 < 30
    assert threading.active_count() < 200


def test_a_client_that_stops_reading_is_dropped_and_its_job_stopped(engine, caplog):
    """Before the fix a client that stopped reading a stream without hanging up held its connection, and the rest of
    its answer in the server's memory, for ever: uvicorn has no write timeout. Small socket buffers make the server's
    writes block after kilobytes (by default it takes megabytes of answer)."""
    import socket

    caplog.set_level(logging.INFO, logger="medsight.server")
    app = create_app(engine, model_name="tiny", send_timeout_s=1.0)
    volume = np.random.default_rng(0).random((16, 64, 64), dtype=np.float32)
    with live_server(app, send_buffer=4096) as url, httpx.Client(base_url=url, timeout=60) as c:
        vid = upload(c, npy(volume), {"modality": "MR"})
        ask = json.dumps({"volume_id": vid, "slices": {"indices": list(range(len(volume)))}, "messages": QUESTION,
                          "options": {"max_new_tokens": 32}, "stream": True}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect((host, int(port)))
            client.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(ask), ask))
            give_up = time.monotonic() + 300  # a hang guard, not a speed requirement
            while "connection dropped" not in caplog.text and time.monotonic() < give_up:
                time.sleep(0.1)
            client.settimeout(30)
            received = b""
            while chunk := client.recv(65536):  # before the fix: no end, socket.timeout
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"event: job" in received
        assert not received.endswith(b"0\r\n\r\n")  # the stream was cut, not finished
        assert c.get("/v1/health").status_code == 200


def test_logs_carry_no_question_text_or_pixels(server, caplog):
    """Questions may name the patient; pixel data is patient data. Neither may reach the logs."""
    secret = "Patient Jane Doe born 1970-01-01: segment the liver"
    caplog.set_level(logging.DEBUG)
    image = np.full((8, 8), 123, np.uint8)
    with httpx.Client(base_url=server, timeout=60) as c:
        vid = upload(c, npy(image), {"modality": "OT"})
        r = c.post("/v1/ask", json={"volume_id": vid, "messages": [{"role": "user", "content": secret}],
                                    "options": {"max_new_tokens": 2}})
        assert r.status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Jane" not in logged and "1970" not in logged
    assert "123, 123" not in logged
    assert any("job" in record.getMessage() for record in caplog.records), "the job itself is logged"
