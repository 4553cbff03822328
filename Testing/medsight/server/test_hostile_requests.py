"""Hostile and broken requests through a real uvicorn server: every one is a 4xx with a clear message, never a 5xx,
and the server answers a valid ask afterwards. Includes the four inputs that used to give 500 and a seeded fuzz run.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
import zipfile
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from medsight.prompt import Message
from medsight.server.admission import prompt_tokens
from medsight.server.app import create_app
from medsight.server.schemas import max_ask_body_bytes
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server

NPY = {"content-type": "application/octet-stream"}
QUESTION = [{"role": "user", "content": "Please segment the white matter."}]


@pytest.fixture(scope="module")
def hardened(engine):
    """A server with small limits, so that the fuzz run stays fast whatever it generates."""
    app = create_app(engine, model_name="tiny", max_upload_bytes=2_000_000, max_voxels=200_000,
                     request_timeout_s=2.0, ask_memory_bytes=64 * 1024**2, read_grace_s=1.0, min_read_rate=10_000)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def ask_limit(engine) -> int:
    """The largest ask body the engine takes for its model."""
    return max_ask_body_bytes(engine.model.config.llm.max_sequence_length)


@pytest.fixture(scope="module")
def volume_id(hardened):
    image = np.random.default_rng(3).integers(0, 400, (4, 24, 20)).astype(np.int16)
    with httpx.Client(base_url=hardened) as c:
        r = c.post("/v1/volumes", content=npy(image), headers=NPY)
        assert r.status_code == 201, r.text
        return r.json()["volume_id"]


def valid_ask(client: httpx.Client, vid: str) -> None:
    r = client.post("/v1/ask", json={"volume_id": vid, "messages": QUESTION, "options": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    assert len(r.json()["answers"]) == 1 and r.headers["x-job-id"] == r.json()["job_id"]


def npy_header_only(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """The bytes of an .npy header declaring `shape`, without its voxels (what a hostile client can send)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


# -- the four inputs that gave 500 ----------------------------------------------------------------------------------
def test_npy_header_declaring_a_huge_shape_is_413_before_reading(hardened):
    header = npy_header_only((4096, 4096, 4096))
    with httpx.Client(base_url=hardened) as c:
        r = c.post("/v1/volumes", content=header + b"\0" * 64, headers=NPY)
    assert r.status_code == 413 and "oversize" in r.json()["message"] and "4096" in r.json()["message"]


def test_npz_zip_body_is_422(hardened):
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros((4, 4), np.float32))
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))
    with httpx.Client(base_url=hardened) as c:
        r = c.post("/v1/volumes", content=buffer.getvalue(), headers=NPY)
    assert r.status_code == 422 and "zip" in r.json()["message"]


def test_boolean_volume_is_422(hardened):
    with httpx.Client(base_url=hardened) as c:
        r = c.post("/v1/volumes", content=npy(np.ones((2, 8, 8), bool)), headers=NPY)
    assert r.status_code == 422 and "bool" in r.json()["message"]


@pytest.mark.parametrize("option", ["temperature", "repetition_penalty"])
def test_tiny_temperature_or_repetition_penalty_with_sampling_is_422(hardened, volume_id, option):
    """Both divide the logits: a tiny value overflows them, and sampling fails on the infinite probabilities. Before
    the fix a repetition penalty of 1e-300 (or 1e-38 at temperature 0.01) was admitted, and the job failed after its
    200 with `internal_error` (RuntimeError: probability tensor contains inf)."""
    with httpx.Client(base_url=hardened, timeout=30) as c:
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION,
                                    "options": {"do_sample": True, option: 1e-300, "max_new_tokens": 2}})
        assert r.status_code == 422 and option in r.json()["message"], r.text
        valid_ask(c, volume_id)



@pytest.mark.parametrize("option", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_float_option_that_is_not_finite_is_422_saying_so(hardened, volume_id, option, value):
    """Before the fix NaN was refused as "Input should be less than or equal to 10" (1 for top_p), which hides the
    problem."""
    body = json.dumps({"volume_id": volume_id, "messages": QUESTION, "options": {option: float(value)}})
    assert value in body  # what Python clients send: json writes NaN and Infinity (a JSON extension) by default
    r = httpx.post(f"{hardened}/v1/ask", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["message"] == f"options.{option}: Input should be a finite number", r.text


@pytest.mark.parametrize(("body", "words"), [
    (b'{"volume_id": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"volume_id": "a", "options": {"seed": ' + b"9" * 5000 + b"}}", "number in it is too long"),
    (b'{"volume_id": "a", messages: []}', "Expecting property name"),
], ids=["latin-1", "deep", "long-number", "unquoted-name"])
def test_a_body_that_is_not_json_is_422_saying_why(hardened, body, words):
    """Before the fix the first three were 400 "There was an error parsing the body" (code http_error, a status the
    API does not list), and the last said only "1: JSON decode error"."""
    r = httpx.post(f"{hardened}/v1/ask", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
    assert r.json()["message"].startswith("the body is not valid JSON") and words in r.json()["message"], r.text


@pytest.mark.parametrize(("change", "field"), [
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"options": {"max_new_tokens": "2"}}, "options.max_new_tokens"),
    ({"options": {"max_new_tokens": 2.0}}, "options.max_new_tokens"),
    ({"options": {"do_sample": "false"}}, "options.do_sample"),
    ({"options": {"temperature": "0.5"}}, "options.temperature"),
    ({"slices": {"indices": [True]}}, "slices.indices.0"),
    ({"slices": {"indices": ["1"]}}, "slices.indices.0"),
    ({"window": {"center": "40", "width": 400}}, "window.center"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_a_value_of_another_json_type_is_422_naming_its_field(hardened, volume_id, change, field):
    """Before the fix each was converted and the ask answered as a different request: "stream": "yes" streamed, an
    index true asked about slice 1, "2" and 2.0 tokens were 2. An integer where a number is expected still counts."""
    body = {"volume_id": volume_id, "messages": QUESTION, "options": {"max_new_tokens": 2}, **change}
    with httpx.Client(base_url=hardened, timeout=30) as c:
        r = c.post("/v1/ask", json=body)
        assert r.status_code == 422 and r.json()["message"].startswith(f"{field}: Input should be"), r.text
        typed = {"options": {"max_new_tokens": 2, "temperature": 1, "do_sample": True}, "stream": False,
                 "slices": {"indices": [1]}, "window": {"center": 40, "width": 400}}
        r = c.post("/v1/ask", json={**body, **typed})
        assert r.status_code == 200 and [a["index"] for a in r.json()["answers"]] == [1], r.text


@pytest.mark.parametrize("window", [{"center": 40, "width": 1e-308}, {"center": 1e29, "width": 1e-3}])
def test_a_window_too_narrow_to_display_is_422(hardened, volume_id, window):
    """Before the fix both were admitted (200): the job's windowing printed numpy's overflow/NaN warnings to the
    engine's terminal and cast NaN voxels to grey."""
    with httpx.Client(base_url=hardened, timeout=30) as c:
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION, "window": window,
                                    "options": {"max_new_tokens": 2}})
        assert r.status_code == 422 and r.json()["code"] == "invalid_window", r.text
        assert f"window width {window['width']:g} is too narrow" in r.json()["message"]


@pytest.mark.parametrize("chosen", [{"indices": [3]}, {"plane": "sagittal"}, {"plane": "axial", "indices": [0]}])
def test_a_view_with_plane_or_indices_is_422(hardened, volume_id, chosen):
    """Before the fix the view silently won: an ask naming slice 3 (or the sagittal plane) was answered about the
    axial slice 0 that the view shows."""
    view = np.eye(4).tolist()
    with httpx.Client(base_url=hardened, timeout=30) as c:
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION, "options": {"max_new_tokens": 2},
                                    "slices": {"view": view, **chosen}})
        assert r.status_code == 422 and "give a view or plane and indices, not both" in r.json()["message"], r.text
        assert all(name in r.json()["message"] for name in chosen)
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION, "options": {"max_new_tokens": 2},
                                    "slices": {"view": view}})
        assert r.status_code == 200 and [(a["plane"], a["index"]) for a in r.json()["answers"]] == [("axial", 0)]


def test_a_body_of_many_unknown_fields_or_view_rows_is_one_error(hardened, volume_id, ask_limit):
    """Before the fix each unknown field (and each row of a view) was an error of its own, every one made into a
    dict on the event loop: 6.7 MB of view rows held the server, health and cancel included, for 12-15 s."""
    many = ask_limit // 16  # as many as an ask body the engine reads can hold, about 12 bytes each
    with httpx.Client(base_url=hardened, timeout=120) as c:
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION,
                                    **{f"k{i}": 0 for i in range(many)}})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text[:300]
        assert r.json()["message"].startswith(f"body: unknown field 'k0' (and {many - 1} more); known: volume_id,")
        r = c.post("/v1/ask", json={"volume_id": volume_id, "messages": QUESTION, "slices": {"view": [["a"]] * many}})
        assert r.status_code == 422, r.text[:300]
        assert r.json()["message"] == f"slices.view: List should have at most 4 items after validation, not {many}"
        valid_ask(c, volume_id)


# -- geometry ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "words"), [
    ({"direction": "1,0.5,0,0,1,0,0,0,1"}, "orthonormal"),  # a shear: determinant 1, not a rotation
    ({"spacing": "1e308,1,1"}, "spacing"),
    ({"spacing": "0,1,1"}, "spacing"),
    ({"spacing": "1,5e-324,1"}, "spacing must be 3 numbers in [0.0001, 100000] mm, got [1.0, 5e-324, 1.0]"),
    ({"spacing": "1,1,1e-9"}, "got [1.0, 1.0, 1e-09]"),  # before the fix both were stored (201)
    ({"origin": "1e300,0,0"}, "origin"),
])
def test_bad_geometry_is_422(hardened, params, words):
    sheared = np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]])
    assert abs(np.linalg.det(sheared) - 1) < 1e-12  # what the old determinant check accepted
    with httpx.Client(base_url=hardened) as c:
        r = c.post("/v1/volumes", content=npy(np.zeros((2, 8, 8), np.float32)), params=params, headers=NPY)
    assert r.status_code == 422 and words in r.json()["message"], r.text


# -- browsers' simple requests and DNS rebinding --------------------------------------------------------------------
ENDPOINTS = [("GET", "/v1/health"), ("GET", "/v1/model"), ("POST", "/v1/volumes"), ("GET", "/v1/volumes/x"),
             ("POST", "/v1/ask"), ("POST", "/v1/jobs/x/cancel"), ("GET", "/openapi.json"), ("GET", "/docs")]


def test_foreign_host_header_is_refused_on_every_endpoint(hardened, volume_id):
    body = {"/v1/volumes": (npy(np.zeros((2, 4, 4), np.float32)), NPY),
            "/v1/ask": (json.dumps({"volume_id": volume_id, "messages": QUESTION,
                                    "options": {"max_new_tokens": 1}}).encode(), {"content-type": "application/json"})}
    # The ask with the right host runs on the model: httpx's 5 s default could cut it on a loaded machine.
    with httpx.Client(base_url=hardened, timeout=60) as c:
        for method, path in ENDPOINTS:
            content, headers = body.get(path, (None, {}))
            for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
                r = c.request(method, path, content=content, headers={**headers, "host": host})
                assert r.status_code == 421, (method, path, host, r.status_code)
                assert r.json()["code"] == "unknown_host"
            assert c.request(method, path, content=content, headers={**headers, "host": "localhost"}).status_code \
                < 500


def test_uploads_need_a_binary_content_type_and_asks_json(hardened, volume_id):
    data = npy(np.zeros((2, 4, 4), np.float32))
    ask = json.dumps({"volume_id": volume_id, "messages": QUESTION, "options": {"max_new_tokens": 1}}).encode()
    with httpx.Client(base_url=hardened) as c:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = c.post("/v1/volumes", content=data, headers={"content-type": content_type})
            assert r.status_code == 415 and "octet-stream" in r.json()["message"]
            assert c.post("/v1/ask", content=ask, headers={"content-type": content_type}).status_code == 415
        assert c.post("/v1/volumes", content=data).status_code == 415  # no Content-Type at all
        assert c.post("/v1/ask", content=ask).status_code == 415
        assert c.post("/v1/volumes", content=data, headers={"content-type": "application/x-npy"}).status_code == 201


def test_cross_site_origin_is_refused(hardened):
    with httpx.Client(base_url=hardened) as c:
        assert c.get("/v1/health", headers={"origin": "https://evil.example"}).status_code == 403
        assert c.post("/v1/jobs/x/cancel", headers={"origin": "null"}).status_code == 403
        assert c.get("/v1/health", headers={"origin": hardened}).status_code == 200  # /docs on the engine itself


def test_a_header_the_guard_decides_on_given_twice_is_400(engine):
    """The guard judged the last of two such headers, the framework used the first: a foreign Origin before this
    engine's passed, and so did a wrong token before the right one."""
    with live_server(create_app(engine, model_name="tiny", token="s3cret")) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        auth, json_type = ("authorization", "Bearer s3cret"), ("content-type", "application/json")
        ask = json.dumps({"volume_id": "never-uploaded", "messages": QUESTION}).encode()  # refused before it is read
        twice = {
            "origin": [auth, ("origin", "https://evil.example"), ("origin", url)],
            "authorization": [("authorization", "Bearer wrong"), auth],
            "content-type": [auth, ("content-type", "text/plain"), json_type],
        }
        for name, headers in twice.items():
            for request in (("GET", "/v1/health", None), ("POST", "/v1/ask", ask)):
                reply = c.request(request[0], request[1], content=request[2], headers=headers)
                assert reply.status_code == 400, (name, request[:2], reply.text)
                assert reply.json() == {"code": "duplicate_header",
                                        "message": f"the request gives the {name} header more than once"}
        assert c.get("/v1/health", headers=[auth, ("origin", url)]).status_code == 200


# -- slow and broken connections ------------------------------------------------------------------------------------
def _raw_upload(url: str, declared: int, payload: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/volumes HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + payload)
    return s


def _raw_ask_reply(url: str, declared: int) -> str:
    """The engine's whole reply to an ask that declares `declared` body bytes and sends only its first one."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/ask HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared}\r\n\r\n{{".encode())
        s.settimeout(10)
        reply = b""
        while chunk := s.recv(4096):  # the engine closes the connection after its reply
            reply += chunk
    return reply.decode("latin-1")


def test_slow_half_open_uploads_are_cut(hardened):
    """Bodies trickling in under the minimum rate get 408 after the grace period (1 s here)."""
    body = npy(np.zeros((4, 64, 64), np.float32))
    sockets = [_raw_upload(hardened, len(body), body[:100]) for _ in range(8)]
    t0 = time.monotonic()
    try:
        for s in sockets:
            s.settimeout(10)
            reply = s.recv(4096).decode("latin-1")
            assert reply.startswith("HTTP/1.1 408"), reply[:80]
        assert time.monotonic() - t0 < 5
    finally:
        for s in sockets:
            s.close()


def test_a_slow_ask_body_is_408_like_a_slow_upload(hardened):
    """Before the fix the deadline's error, raised while the framework parsed the ask's JSON, became 400 "There was
    an error parsing the body"."""
    reply = _raw_ask_reply(hardened, declared=1000)
    assert reply.startswith("HTTP/1.1 408") and '"body_timeout"' in reply, reply[:200]


def test_client_dropping_mid_upload_is_not_an_internal_error(hardened, volume_id, caplog):
    caplog.set_level(logging.INFO, logger="medsight.server")
    body = npy(np.zeros((4, 64, 64), np.float32))
    s = _raw_upload(hardened, len(body), body[:len(body) // 2])
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    logged = [r for r in caplog.records if r.name == "medsight.server"]
    assert not [r for r in logged if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in logged]
    assert any("disconnected" in r.getMessage() for r in logged)
    with httpx.Client(base_url=hardened, timeout=30) as c:
        valid_ask(c, volume_id)


def test_an_oversized_ask_body_is_413_before_it_is_read(hardened, ask_limit):
    """Before the fix an ask body was read whole whatever its size (200 MiB took 850 MiB of memory) and only then
    refused as invalid; now a declared length over the limit is refused at once, a body without one when it passes
    the limit."""
    reply = _raw_ask_reply(hardened, declared=200 * 1024**2)
    assert reply.startswith("HTTP/1.1 413") and '"too_large"' in reply, reply[:200]
    assert str(ask_limit) in reply

    def chunks():  # no Content-Length: sent chunked
        yield b'{"volume_id": "x", "messages": [{"role": "user", "content": "'
        for _ in range(ask_limit // 2**16 + 2):
            yield b"a" * 2**16
        yield b'"}]}'

    with httpx.Client(base_url=hardened, timeout=30) as c:
        r = c.post("/v1/ask", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text[:200]


def test_an_ask_body_longer_than_any_conversation_the_prompt_holds_is_413(engine, hardened, volume_id, ask_limit):
    """An ask's JSON is parsed on the server's event loop, holding every other client while it lasts: under the old
    limit (13 MB, 64 messages of 16,000 characters each escaped at worst) a body of unknown fields held /v1/health
    for 2.6 s, one of slice indices for 0.7 s. Now an ask may be as long as the longest conversation that the
    model's prompt can hold: a body twice that is refused before it is read, naming the limit and why."""
    fields = ask_limit // 10  # about 12 bytes each: the body is 1.2 to 1.3 times the limit
    body = json.dumps({"volume_id": volume_id, "messages": QUESTION, **{f"k{i}": 0 for i in range(fields)}})
    assert ask_limit < len(body) <= 2 * ask_limit
    with httpx.Client(base_url=hardened, timeout=60) as c:
        r = c.post("/v1/ask", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "too_large", r.text[:200]
        tokens = engine.model.config.llm.max_sequence_length
        assert r.json()["message"] == (f"/v1/ask takes at most {ask_limit} bytes (the longest conversation that the "
                                       f"model's prompt of {tokens} tokens can hold), got {len(body)}")
        valid_ask(c, volume_id)


def _heaviest_text(engine) -> str:
    """One character that JSON writes as the most bytes per token of the model's tokenizer, among a few kinds."""
    candidates = ["\x01", "\u00e9", "\u2014", "\U0001F600", " ", "a"]

    def bytes_per_token(c: str) -> float:
        return len(json.dumps(c * 8)) / len(engine.model.tokenizer(c * 8, add_special_tokens=False)["input_ids"])

    return max(candidates, key=bytes_per_token)


def test_the_longest_conversation_the_prompt_holds_is_answered(engine, server, ask_limit):
    """The ask body limit keeps every conversation the model can take: one filling the prompt to its last token,
    with the characters its JSON writes longest and indented, is answered."""
    limit = engine.model.config.llm.max_sequence_length
    unit = _heaviest_text(engine)

    def conversation(n: int) -> list[dict]:
        return [{"role": "user", "content": "Where is the lesion?"}, {"role": "assistant", "content": unit * n},
                {"role": "user", "content": "And the liver?"}]

    def length(n: int) -> int:
        try:
            return prompt_tokens(engine, [Message(m["role"], m["content"]) for m in conversation(n)])
        except ValueError:  # the prompt is too long
            return limit + 1

    lo, hi = 0, limit
    while lo < hi:  # the most characters whose prompt still fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) <= limit else (lo, mid - 1)
    assert limit - 4 <= length(lo) <= limit
    image = np.zeros((2, 16, 16), np.int16)
    with httpx.Client(base_url=server, timeout=120) as c:
        vid = c.post("/v1/volumes", content=npy(image), headers=NPY).json()["volume_id"]
        body = json.dumps({"volume_id": vid, "messages": conversation(lo), "slices": {"indices": [0]},
                           "options": {"max_new_tokens": 1}}, indent=4)
        r = c.post("/v1/ask", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["answers"]) == 1
        over = json.dumps({"volume_id": vid, "messages": conversation(lo + 1), "options": {"max_new_tokens": 1}})
        r = c.post("/v1/ask", content=over, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "prompt" in r.json()["message"], r.text[:300]
    assert len(body) <= ask_limit


# -- fuzz -------------------------------------------------------------------------------------------------------------
def _weird_value(rng: np.random.Generator):
    choices = [None, True, -1, 0, 2**63, -(2**70), 1e308, -1e-300, float("nan"), "", "x" * 20_000, "\u0000\ud7ff",
               [], {}, [[[[[]]]]], {"a": {"b": [1, "2"]}}, "axial", 3.5, "1e999"]
    return choices[int(rng.integers(len(choices)))]


def _mutated_ask(rng: np.random.Generator, vid: str) -> dict | list | str:
    ask = {"volume_id": vid, "slices": {"plane": "axial", "indices": [0, 1]}, "messages": [dict(m) for m in QUESTION],
           "options": {"max_new_tokens": 2, "do_sample": bool(rng.integers(2)), "temperature": 0.7,
                       "top_p": 0.9, "top_k": 5, "seed": 1},
           "window": {"center": 40, "width": 400}, "stream": bool(rng.integers(2))}
    for _ in range(int(rng.integers(1, 4))):
        targets = [ask, ask["slices"], ask["options"], ask["window"],
                   ask["messages"][0] if isinstance(ask["messages"], list) and ask["messages"] else None]
        target = targets[int(rng.integers(5))]
        if not isinstance(target, dict):
            continue
        keys = [*target.keys(), "extra"]
        target[keys[int(rng.integers(len(keys)))]] = _weird_value(rng)
    if rng.random() < 0.05:
        return [ask]
    return ask


def _mutated_npy(rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(6))
    if kind == 0:  # a header declaring a random shape/dtype, with too few or too many bytes
        dtype = ["<f4", "|b1", "|O", "<c8", "<U3", "<i2", ">f8", "|V4", "<M8[s]"][int(rng.integers(9))]
        shape = tuple(int(n) for n in rng.integers(0, 2000, int(rng.integers(0, 6))))
        return npy_header_only(shape, dtype) + rng.bytes(int(rng.integers(0, 300)))
    if kind == 1:  # a valid array, truncated or extended
        data = npy(rng.random((2, 8, 8)).astype(np.float32))
        return data[: int(rng.integers(len(data)))] if rng.random() < 0.5 else data + b"\0" * 4
    if kind == 2:  # bytes flipped in a valid header
        data = bytearray(npy(rng.integers(0, 9, (2, 6, 6)).astype(np.uint8)))
        for _ in range(3):
            data[int(rng.integers(min(len(data), 128)))] = int(rng.integers(256))
        return bytes(data)
    if kind == 3:
        return rng.bytes(int(rng.integers(0, 2000)))
    if kind == 4:  # NaN voxels, empty arrays, odd dimensions
        arrays = [np.full((2, 3, 3), np.nan, np.float32), np.zeros((0, 4, 4), np.float32),
                  np.zeros((2, 2, 2, 2, 2), np.float32), np.zeros(7, np.int16), np.zeros((3, 3, 3, 4), np.uint8)]
        return npy(arrays[int(rng.integers(len(arrays)))])
    return b"\x93NUMPY\x03\x00" + rng.bytes(40)


def test_seeded_fuzz_over_every_endpoint_gives_no_5xx(hardened, volume_id):
    rng = np.random.default_rng(20260419)
    count, statuses, t0 = 2100, {}, time.monotonic()
    with httpx.Client(base_url=hardened, timeout=120) as c:
        for n in range(count):
            which = n % 7
            headers, params, content = {}, None, None
            if which == 0:
                method, path = "POST", "/v1/ask"
                body = _mutated_ask(rng, volume_id)
                content = json.dumps(body).encode() if rng.random() < 0.9 else json.dumps(body).encode()[:20]
                headers = {"content-type": "application/json"}
            elif which == 1:
                method, path = "POST", "/v1/volumes"
                content, headers = _mutated_npy(rng), dict(NPY)
                params = {k: ",".join(str(_weird_value(rng))[:200] for _ in range(int(rng.integers(1, 10))))
                          for k in ("spacing", "origin", "direction", "modality") if rng.random() < 0.3}
            elif which == 2:
                method, path = "GET", "/v1/volumes/" + quote(str(_weird_value(rng)), safe="", errors="replace")
            elif which == 3:
                method, path = "POST", f"/v1/jobs/{rng.bytes(8).hex()}/cancel"
            elif which == 4:
                method = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"][int(rng.integers(6))]
                path = ["/v1/health", "/v1/model", "/v1/ask", "/v1/volumes", "/nope", "/v1/jobs//cancel"][
                    int(rng.integers(6))]
            elif which == 5:  # header games
                method, path = ["GET", "POST"][int(rng.integers(2))], "/v1/health"
                values = ["evil.example", "null", "a" * 5000, "localhost:99999", "[::1]", "a b"]
                names = ["host", "origin", "content-type", "authorization"]
                headers = {names[int(rng.integers(4))]: values[int(rng.integers(6))]}
            else:
                method, path = "POST", "/v1/ask"
                content = rng.bytes(int(rng.integers(0, 500)))
                headers = {"content-type": "application/json"}
            try:
                r = c.request(method, path, content=content, headers=headers, params=params)
            # The server may close a connection it refused early; httpx refuses to send some inputs at all.
            except (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.InvalidURL):
                continue
            except httpx.TimeoutException:  # a hang is a failure too: say which request
                raise AssertionError(f"request {n} hung: {method} {path} {headers} {params} "
                                     f"{(content or b'')[:300]!r}") from None
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
        valid_ask(c, volume_id)
    assert sum(statuses.values()) >= 2000, statuses
    assert time.monotonic() - t0 < 300


def test_refusals_do_not_echo_a_huge_field_name_or_value_back(hardened, volume_id, ask_limit):
    """Error messages quote what they refuse: a megabyte-long unknown field, volume id, window preset or option name
    came back whole in the 422 (1,000,071 bytes for the field). Now the message is cut at MAX_ERROR_MESSAGE."""
    from medsight.server.app import MAX_ERROR_MESSAGE

    huge = "X" * (ask_limit // 4)
    base = {"volume_id": volume_id, "slices": {"indices": [1]}, "messages": [{"role": "user", "content": "Where?"}]}
    bodies = {"field": {**base, huge: 1}, "volume": {**base, "volume_id": huge},
              "preset": {**base, "window": {"preset": huge}}, "option": {**base, "options": {huge: 1}}}
    with httpx.Client(base_url=hardened, timeout=60) as c:
        for name, body in bodies.items():
            r = c.post("/v1/ask", json=body)
            assert r.status_code == 422, (name, r.status_code)
            assert r.json()["code"] in ("invalid_request", "unknown_volume", "invalid_window"), (name, r.json()["code"])
            assert len(r.json()["message"]) <= MAX_ERROR_MESSAGE, name
            assert len(r.content) < 2 * MAX_ERROR_MESSAGE, (name, len(r.content))
