"""The client against a scripted stdlib HTTP server: requests it sends, error mapping, retries, streaming."""

from __future__ import annotations

import io
import json
import socket
import time

import numpy as np
import pytest

from MedSIGHTSlicerLib.client import (
    ASK_BYTES_ALWAYS_READ,
    ERROR_HINTS,
    AskStream,
    MedSIGHTClient,
    MedSIGHTError,
    describe_error,
)
from MedSIGHTSlicerLib.protocol import build_ask_request, npy_bytes, npy_parts

HEALTH = {"status": "ok", "version": "0.1.0", "model": "tiny", "device": "cpu", "dtype": "float32"}
VOLUME = {"volume_id": "ab" * 32, "shape": [4, 5, 6], "modality": "CT", "slices": {"axial": 4}, "bytes": 480}
ANSWER = {"plane": "axial", "index": 1, "text": "ok", "regions": [], "slice_to_ras": np.eye(4).tolist()}
DONE = {"job_id": "j1", "model": "tiny", "answers": [ANSWER], "timings": {"generate": 0.5}}


def client_for(fake, **kwargs) -> MedSIGHTClient:
    kwargs.setdefault("backoff", 0.0)
    return MedSIGHTClient(fake.url, **kwargs)


def sse(kind: str, data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- requests ---------------------------------------------------------------------------------------------------
def test_health_and_bearer_token(fake):
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH))
    health = client_for(fake, token="s3cret").health()
    assert (health.status, health.model, health.device) == ("ok", "tiny", "cpu")
    assert fake.requests[0].headers["Authorization"] == "Bearer s3cret"
    client_for(fake).health()
    assert "Authorization" not in fake.requests[1].headers


def test_base_url_path_prefix_is_kept(fake):
    fake.add("GET", "/engine/v1/health", fake.reply(200, HEALTH))
    assert MedSIGHTClient(fake.url + "/engine/").health().version == "0.1.0"


@pytest.mark.parametrize("prefix", ["", "/engine"])
def test_the_address_the_engine_prints_works_as_the_url(fake, prefix):
    """The engine prints "MedSIGHT engine (demo) on http://127.0.0.1:8765/v1"; pasted as the engine URL, every request
    went to /v1/v1/... and the engine answered 404."""
    fake.add("GET", f"{prefix}/v1/health", fake.reply(200, HEALTH))
    for typed in (f"{fake.url}{prefix}/v1", f"{fake.url}{prefix}/v1/"):
        client = MedSIGHTClient(typed)
        assert (client.health().model, client.base_url) == (HEALTH["model"], fake.url + prefix)
    assert [r.path for r in fake.requests] == [f"{prefix}/v1/health"] * 2


@pytest.mark.parametrize("url", ["http://host name:8765", "http://127.0.0.1:99999", "http://127.0.0.1:0",
                                 "http://127.0.0.1:port", "ftp://127.0.0.1:8765", "127.0.0.1:8765",
                                 "http://[::1:8765", "http://::1]:8765"])
def test_a_malformed_engine_url_is_refused_naming_it(url):
    """Typed into the module's URL box: refused at once with the URL, not later as a connection failure or with
    urllib's own words."""
    with pytest.raises(ValueError, match="base_url must look like http://host:port") as caught:
        MedSIGHTClient(url)
    assert repr(url) in str(caught.value)


@pytest.mark.parametrize("token", ["pässwörd", "€uro", "tab\tinside", "line\nbreak"])
def test_a_token_no_engine_accepts_is_refused_naming_the_character(token):
    """Typed into the module's token box: http.client raised a bare UnicodeEncodeError at the first request for
    "€", and sent "ä" as one Latin-1 byte no engine accepts. Now refused at once, without echoing the token."""
    with pytest.raises(ValueError, match="the token must be printable ASCII") as caught:
        MedSIGHTClient("http://127.0.0.1:8765", token=token)
    first = next(i for i, c in enumerate(token) if not " " <= c <= "~")
    assert f"character {first + 1} is not" in str(caught.value) and token not in str(caught.value)


def test_upload_sends_npy_and_geometry(fake):
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH))  # an older engine: no upload limits published
    fake.add("POST", "/v1/volumes", fake.reply(200, VOLUME))
    voxels = np.arange(120, dtype=np.int16).reshape(4, 5, 6) - 1000
    direction = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    info = client_for(fake).upload_volume(voxels, (0.5, 0.75, 2.0), (-10, 20.5, 3), direction, modality="CT")
    assert info.volume_id == "ab" * 32
    assert info.shape == (4, 5, 6)
    assert info.bytes == 480
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/v1/health"), ("POST", "/v1/volumes")]
    request = fake.requests[1]
    assert request.headers["Content-Type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(request.body), allow_pickle=False), voxels)
    assert request.query == {
        "modality": "CT",
        "spacing": "0.5,0.75,2.0",
        "origin": "-10.0,20.5,3.0",
        "direction": "1.0,0.0,0.0,0.0,0.0,1.0,0.0,-1.0,0.0",
    }


def test_an_upload_sends_the_voxels_from_their_own_buffer():
    """A volume in Slicer may be gigabytes: the body is sent from the array's buffer, never copied into one (np.save
    into a BytesIO held up to two more at the peak: 2.0 volumes here). The engine still gets np.save's exact bytes, in
    one declared length (not chunked: the engine refuses an oversized upload on its Content-Length)."""
    import hashlib
    import tracemalloc

    from medsight_testing.body_sink import body_sink

    voxels = (np.arange(32 * 256 * 512, dtype=np.int64) % 3001 - 1000).astype(np.int16).reshape(32, 256, 512)
    expected = npy_bytes(voxels)
    with body_sink(VOLUME) as sink:
        client = MedSIGHTClient(sink.url)
        tracemalloc.start()
        try:
            client.upload_volume(voxels, modality="CT")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    received = sink.received[-1]
    assert (received.length, received.sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
    assert received.headers["Content-Length"] == str(len(expected)) and "Transfer-Encoding" not in received.headers
    assert peak / voxels.nbytes < 0.1


def test_the_timeout_bounds_each_piece_of_an_upload_not_the_whole_volume():
    """A large volume over a slow link takes longer than the client's timeout to send, and is still arriving: the
    timeout is for a stalled engine. The body went in one sendall, whose timeout bounds the whole send, so it failed
    with "timed out" once the volume took longer than that."""
    from medsight_testing.body_sink import body_sink

    timeout, pause = 1.5, 0.005  # the sink reads 64 KiB per pause: a 40 MiB volume in over 3 s
    voxels = np.zeros((80, 512, 512), np.int16)
    with body_sink(VOLUME, pause=pause) as sink:
        info = MedSIGHTClient(sink.url, timeout=timeout).upload_volume(voxels)
    assert info.volume_id == VOLUME["volume_id"]
    assert sink.received[-1].length == voxels.nbytes + len(npy_parts(voxels)[0])
    assert voxels.nbytes / 65536 * pause > 2 * timeout  # the sink's pauses alone outlast the timeout


@pytest.mark.parametrize("make", [lambda a: a.astype(">i2"), lambda a: a[:, ::2].astype(np.float32),
                                  lambda a: np.asfortranarray(a).astype(np.uint16), lambda a: a[1]],
                         ids=["big-endian", "strided float", "fortran order", "2D"])
def test_an_upload_body_is_what_np_save_writes(make):
    """Header and voxels, sent as parts, are byte for byte np.save's file of the array in C order (as uploads always
    were), whatever its byte order, strides or dtype: the engine reads the body as that file, and its volume id
    hashes the voxels it reads."""
    import hashlib

    from medsight_testing.body_sink import body_sink

    array = make(np.arange(4 * 6 * 10, dtype=np.int16).reshape(4, 6, 10) * 7 - 300)
    saved = io.BytesIO()
    np.save(saved, np.ascontiguousarray(array), allow_pickle=False)
    with body_sink(VOLUME) as sink:
        MedSIGHTClient(sink.url).upload_volume(array)
    assert sink.received[-1].sha256 == hashlib.sha256(saved.getvalue()).hexdigest()
    assert npy_bytes(array) == saved.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"array": np.zeros((2, 2, 2), dtype=object)}, "dtype"),
        ({"array": np.zeros(5)}, "dimensions"),
        ({"spacing": (1, 1)}, "spacing needs 3"),
        ({"spacing": (1, 0, 1)}, "positive"),
        ({"origin": (0, float("nan"), 0)}, "finite"),
        ({"direction": np.eye(2)}, "direction needs 9"),
        ({"modality": ""}, "modality"),
    ],
)
def test_upload_rejects_bad_input_before_sending(fake, kwargs, words):
    args = {"array": np.zeros((2, 3, 4), np.float32)} | kwargs
    with pytest.raises(ValueError, match=words):
        client_for(fake).upload_volume(**args)
    assert fake.requests == []


def test_upload_limits_are_fetched_once_and_again_only_before_refusing(fake):
    """The limits come from the first upload's health look-up and serve every later upload; a volume over them is
    checked against a fresh look-up (the engine may have restarted with higher limits) before it is refused."""
    small = np.zeros((2, 3, 4), np.int16)
    larger = np.zeros((3, 3, 4), np.int16)
    largest = np.zeros((4, 3, 4), np.int16)
    low, high = (len(npy_bytes(a)) for a in (small, larger))
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH | {"max_upload_bytes": low, "max_voxels": larger.size}),
             fake.reply(200, HEALTH | {"max_upload_bytes": high, "max_voxels": larger.size}))
    fake.add("POST", "/v1/volumes", fake.reply(200, VOLUME))
    client = client_for(fake)
    for array in (small, small, larger):
        client.upload_volume(array)
    assert (fake.hits("GET", "/v1/health"), fake.hits("POST", "/v1/volumes")) == (2, 3)
    with pytest.raises(MedSIGHTError) as refused:
        client.upload_volume(largest)
    assert (fake.hits("GET", "/v1/health"), fake.hits("POST", "/v1/volumes")) == (3, 3)
    assert (refused.value.status, refused.value.code) == (None, "too_large")
    assert f"{len(npy_bytes(largest)):,} bytes" in refused.value.message
    assert f"upload limit of {high:,} bytes" in refused.value.message


def test_after_the_engines_own_413_the_limits_are_fetched_again(fake):
    """Limits that were too high (the engine restarted with lower ones) let one upload through to its 413, which names
    the engine's new limit, fetched at once; the next upload is refused without sending (its check looks the limits up
    once more before refusing)."""
    array = np.zeros((2, 3, 4), np.int16)
    size = len(npy_bytes(array))
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH | {"max_upload_bytes": size, "max_voxels": array.size}),
             fake.reply(200, HEALTH | {"max_upload_bytes": size - 1, "max_voxels": array.size}))
    fake.add("POST", "/v1/volumes", fake.reply(413, {"code": "too_large", "message": "over the limit"}))
    client = client_for(fake)
    errors = []
    for _ in range(2):
        with pytest.raises(MedSIGHTError, match="too_large") as refused:
            client.upload_volume(array)
        errors.append(refused.value)
    assert (fake.hits("GET", "/v1/health"), fake.hits("POST", "/v1/volumes")) == (3, 1)
    assert [e.status for e in errors] == [413, None]
    for err, outcome in zip(errors, ("the engine refused it", "nothing was sent")):
        assert err.message.endswith(f"over the engine's upload limit of {size - 1:,} bytes "
                                    f"({(size - 1) / 2**20:.1f} MiB, medsight serve --max-upload-mb); {outcome}")


def test_after_the_engines_own_413_on_an_ask_its_limit_is_fetched_and_named(fake):
    """An ask over the limit from a client whose limits are out of date (an older engine's health without the ask
    limit, or one from before a restart) reaches the engine and its 413; the client then fetched the limits no more,
    so every later ask was sent again and answered by the engine's generic 413. Now the limits are fetched at once,
    the error names the engine's limit, and the next ask, plain or streamed, is refused unsent."""
    question = "x" * (2 * ASK_BYTES_ALWAYS_READ)
    size = len(json.dumps(build_ask_request("ab" * 32, question, "axial", [0], None, None, stream=False),
                          separators=(",", ":")).encode())
    limit = size - 100  # under the streamed ask's body too ("stream":true is a byte shorter)
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH),  # an older engine's: no ask limit
             fake.reply(200, HEALTH | {"max_ask_body_bytes": limit}))
    fake.add("POST", "/v1/ask", fake.reply(413, {"code": "too_large", "message": f"takes at most {limit} bytes"}))
    client = client_for(fake)
    with pytest.raises(MedSIGHTError) as engines:
        client.ask("ab" * 32, question)
    assert (fake.hits("GET", "/v1/health"), fake.hits("POST", "/v1/ask")) == (2, 1)
    assert (engines.value.status, engines.value.code) == (413, "too_large")
    named = f"are {size:,} bytes to send, over the engine's limit of {limit:,} bytes for an ask"
    assert named in engines.value.message and engines.value.message.endswith("; the engine refused it")
    for ask in (client.ask, client.ask_stream):
        with pytest.raises(MedSIGHTError) as refused:
            ask("ab" * 32, question)
        assert (refused.value.status, refused.value.code) == (None, "too_large")
        assert refused.value.message.endswith("; nothing was sent")
    assert fake.hits("POST", "/v1/ask") == 1


def test_an_upload_over_the_voxel_limit_is_refused_before_sending(fake):
    image = np.zeros((6, 7, 3), np.uint8)  # an RGB image: the engine counts its 3 values per pixel
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH | {"max_upload_bytes": 2**30, "max_voxels": image.size - 1}))
    with pytest.raises(MedSIGHTError, match=f"has {image.size} voxels, over the engine's limit of {image.size - 1}"):
        client_for(fake).upload_volume(image)
    assert fake.hits("POST", "/v1/volumes") == 0


def test_ask_sends_the_request_and_parses_the_answer(fake):
    fake.add("POST", "/v1/ask", fake.reply(200, DONE))
    result = client_for(fake).ask(
        "ab" * 32,
        [("system", "be brief"), ("user", "where?")],
        plane="coronal",
        indices=[1, np.int64(2)],
        options={"max_new_tokens": 8},
        window=(40, 400),
    )
    assert result.job_id == "j1"
    assert result.answers[0].slice_to_ras.shape == (4, 4)
    assert result.timings == {"generate": 0.5}
    assert json.loads(fake.requests[0].body) == {
        "volume_id": "ab" * 32,
        "slices": {"plane": "coronal", "indices": [1, 2]},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where?"}],
        "options": {"max_new_tokens": 8},
        "window": {"center": 40.0, "width": 400.0},
        "stream": False,
    }


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"plane": "oblique"}, "plane"),
        ({"indices": []}, "indices is empty"),
        ({"indices": [1.5]}, "integers"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [("robot", "hi")]}, "role"),
        ({"messages": [("user", 3)]}, "content"),
        ({"window": (40, -1)}, "positive width"),
    ],
)
def test_ask_rejects_bad_arguments_before_sending(fake, kwargs, words):
    args = {"volume_id": "v", "messages": "where?"} | kwargs
    with pytest.raises(ValueError, match=words):
        client_for(fake).ask(**args)
    assert fake.requests == []


def test_cancel_quotes_the_job_id(fake):
    fake.add("POST", "/v1/jobs/a%2Fb/cancel", fake.reply(200, {"job_id": "a/b", "cancelled": True}))
    assert client_for(fake).cancel("a/b").cancelled is True


# -- errors -----------------------------------------------------------------------------------------------------
def test_error_body_becomes_medsight_error(fake):
    fake.add("GET", "/v1/volumes/nope", fake.reply(404, {"code": "not_found", "message": "unknown volume nope"}))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).volume_info("nope")
    err = info.value
    assert (err.status, err.code, err.message) == (404, "not_found", "unknown volume nope")
    assert err.body == {"code": "not_found", "message": "unknown volume nope"}
    assert err.url == f"{fake.url}/v1/volumes/nope"
    assert "HTTP 404" in str(err)
    assert fake.hits("GET", "/v1/volumes/nope") == 1  # a 404 is not retried


def busy_reply(retry_after: str):
    def handler(h) -> None:
        data = json.dumps({"code": "busy", "message": "the engine is receiving other uploads"}).encode()
        h.send_response(429)
        h.send_header("Content-Type", "application/json")
        h.send_header("Retry-After", retry_after)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return handler


@pytest.mark.parametrize(("header", "seconds"), [("3", 3.0), ("0.5", 0.5), ("Wed, 21 Oct 2026 07:28:00 GMT", None)])
def test_busy_refusal_carries_retry_after(fake, header, seconds):
    """429 "busy" with Retry-After (uploads and asks): the seconds reach the caller, which waits them out; the
    HTTP-date form, which the engine never sends, gives None. A POST is still never retried by the client itself."""
    fake.add("POST", "/v1/volumes", busy_reply(header))
    fake.add("POST", "/v1/ask", busy_reply(header))
    with pytest.raises(MedSIGHTError) as upload:
        client_for(fake).upload_volume(np.zeros((2, 3, 4), np.int16))
    with pytest.raises(MedSIGHTError) as stream:
        client_for(fake).ask_stream("v" * 64, "Where?", indices=[0])
    for err in (upload.value, stream.value):
        assert (err.status, err.code, err.retry_after) == (429, "busy", seconds)
    assert fake.hits("POST", "/v1/volumes") == 1 and fake.hits("POST", "/v1/ask") == 1


def test_error_body_under_200_is_the_engines_error(fake):
    """A plain ask's 200 goes out before its job runs; a job that fails sends its error body under it."""
    failure = {"code": "internal_error", "message": "the engine failed: RuntimeError"}
    fake.add("POST", "/v1/ask", fake.reply(200, failure))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask("v", "q")
    err = info.value
    assert (err.status, err.code, err.message, err.body) == (200, "internal_error", failure["message"], failure)


def test_non_json_error_body(fake):
    fake.add("POST", "/v1/ask", fake.reply(500, b"Internal Server Error", content_type="text/plain"))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask("v", "q")
    assert (info.value.status, info.value.code, info.value.message) == (500, "http_500", "Internal Server Error")


@pytest.mark.parametrize(("status", "title"), [(502, "502 Bad Gateway"), (504, "504 Gateway Time-out"),
                                             (413, "413 Request Entity Too Large")])
def test_a_proxys_error_page_is_named_by_its_title_not_pasted_whole(fake, status, title):
    """A proxy in front of the engine answers an HTML page: the error line showed the whole page's markup."""
    page = (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
            "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n").encode()
    fake.add("POST", "/v1/ask", fake.reply(status, page, content_type="text/html"))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask_stream("v", "q")
    err = info.value
    assert (err.status, err.code, err.body) == (status, f"http_{status}", page.decode())
    assert repr(title) in err.message and "proxy" in err.message
    assert ("lost the engine" in err.message) == (status in (502, 504))  # a proxy's 413 has not lost it
    assert "<" not in describe_error(err) and describe_error(err).count(title) == 1


def test_framework_detail_error_body(fake):
    detail = [{"loc": ["body", "messages"], "msg": "Field required"}]
    fake.add("POST", "/v1/ask", fake.reply(422, {"detail": detail}))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask("v", "q")
    assert info.value.status == 422
    assert "Field required" in info.value.message


@pytest.mark.parametrize("body", [{"detail": "Not Found"}, {"code": "http_error", "message": "Not Found"}])
def test_a_404_from_no_engine_route_names_the_address(fake, body):
    """An engine URL with a wrong path answers 404 from no route: another web server's framework ("detail"), or the
    engine's own "http_error" (the engine without the typed prefix). The error line said only "Not Found (HTTP
    404)"."""
    fake.add("POST", "/v1/ask", fake.reply(404, body))
    client = client_for(fake)
    with pytest.raises(MedSIGHTError) as info:
        client.ask_stream("v", "q")
    err = info.value
    assert (err.status, err.code) == (404, body.get("code", "http_404"))
    assert f"{fake.url}/v1/ask" in describe_error(err) and "engine URL" in describe_error(err)


def test_unauthorized(fake):
    fake.add("GET", "/v1/model", fake.reply(401, {"code": "unauthorized", "message": "missing bearer token"}))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).model_card()
    assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_success_without_json_is_a_bad_response(fake):
    fake.add("GET", "/v1/health", fake.reply(200, b"<html>proxy</html>", content_type="text/html"))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).health()
    assert (info.value.status, info.value.code) == (200, "bad_response")
    assert info.value.body == "<html>proxy</html>"


def test_reply_missing_fields_is_a_bad_response(fake):
    fake.add("GET", "/v1/health", fake.reply(200, {"status": "ok"}))
    with pytest.raises(MedSIGHTError, match="lacks") as info:
        client_for(fake).health()
    assert (info.value.status, info.value.code, info.value.body) == (200, "bad_response", {"status": "ok"})


def test_stream_with_a_malformed_event_is_a_bad_response(fake):
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"}), sse("token", {"slice": 0})]))
    stream = client_for(fake).ask_stream("v", "q")
    assert next(stream).kind == "job"
    with pytest.raises(MedSIGHTError) as info:
        next(stream)
    assert info.value.code == "bad_response"
    assert stream.closed


@pytest.mark.parametrize(("kind", "data"), [("token", {"slice": None, "text": "x"}),
                                           ("job", {"job_id": "j1", "indices": 5})])
def test_stream_event_with_a_value_of_the_wrong_type_is_a_bad_response(fake, kind, data):
    """A null slice or a number for the list of indices raised a bare TypeError out of the stream (the panel showed
    "Unexpected error: TypeError ..."), not the "bad_response" of other malformed events."""
    events = [sse("job", {"job_id": "j1"})] if kind != "job" else []
    fake.add("POST", "/v1/ask", fake.sse([*events, sse(kind, data)]))
    stream = client_for(fake).ask_stream("v", "q")
    with pytest.raises(MedSIGHTError) as info:
        list(stream)
    assert (info.value.code, info.value.status) == ("bad_response", 200)
    assert f"malformed {kind!r} event" in info.value.message
    assert stream.closed


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    client = MedSIGHTClient(url, retries=1, backoff=0.0)
    with pytest.raises(MedSIGHTError) as info:
        client.health()
    assert info.value.status is None
    assert info.value.code == "connection_error"
    assert f"{url}/v1/health" in info.value.message
    with pytest.raises(MedSIGHTError) as info:
        client.ask("v", "q")
    assert info.value.status is None


def test_https_to_an_engine_without_tls_names_the_secure_connection(fake):
    """An https:// URL whose engine speaks plain HTTP (or whose certificate this computer does not trust: both fail in
    the TLS handshake) was reported as "cannot reach the engine ... Is the engine running?", which sends the user to
    start an engine that runs; the error names the secure connection and what to check."""
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH))
    client = MedSIGHTClient(fake.url.replace("http://", "https://"), retries=0, timeout=5)
    with pytest.raises(MedSIGHTError) as info:
        client.health()
    err = info.value
    assert (err.status, err.code) == (None, "tls_error")
    text = describe_error(err)
    assert "HTTPS" in text and "certificate" in text and "Is the engine running" not in text
    assert fake.hits("GET", "/v1/health") == 0  # the handshake failed: no request reached the server


@pytest.mark.parametrize("call", ["health", "ask_stream"])
def test_a_redirect_is_named_and_not_followed(fake, call):
    """A 301 to another host is not followed (the bearer token would go there); the error said only "Moved
    Permanently from <url>", not where the engine moved to."""
    elsewhere = "http://other-host.example:9000/v1/health"

    def moved(h) -> None:
        h.send_response(301)
        h.send_header("Location", elsewhere)
        h.send_header("Content-Length", "0")
        h.end_headers()

    fake.add("GET", "/v1/health", moved)
    fake.add("POST", "/v1/ask", moved)
    client = client_for(fake, token="secret", retries=0)
    with pytest.raises(MedSIGHTError) as info:
        client.health() if call == "health" else client.ask_stream("v", "q")
    err = info.value
    assert (err.status, err.code) == (301, "http_301")
    assert elsewhere in describe_error(err) and "engine URL" in describe_error(err)
    assert len(fake.requests) == 1 and fake.requests[0].headers["Authorization"] == "Bearer secret"


def test_timeouts_are_configurable_per_call(fake):
    fake.add("GET", "/v1/health", fake.reply(200, HEALTH, delay=0.5))
    client = client_for(fake, timeout=0.1, retries=0)
    start = time.monotonic()
    with pytest.raises(MedSIGHTError) as info:
        client.health()
    assert time.monotonic() - start < 0.45
    assert (info.value.status, info.value.code) == (None, "timeout")
    assert client.health(timeout=5).model == "tiny"


# -- retries ----------------------------------------------------------------------------------------------------
def test_get_is_retried_on_503_then_succeeds(fake):
    busy = fake.reply(503, {"code": "unavailable", "message": "loading"})
    fake.add("GET", "/v1/health", busy, busy, fake.reply(200, HEALTH))
    assert client_for(fake, retries=2).health().status == "ok"
    assert fake.hits("GET", "/v1/health") == 3


def test_get_gives_up_after_its_retries(fake):
    fake.add("GET", "/v1/health", fake.reply(503, {"code": "unavailable", "message": "loading"}))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake, retries=2).health()
    assert (info.value.status, info.value.code) == (503, "unavailable")
    assert fake.hits("GET", "/v1/health") == 3


def test_a_gets_timeout_bounds_all_its_attempts(fake):
    """The user waits what the timeout says: a GET that timed out is not sent again (each retry waited another
    whole timeout: "Test connection" took three timeouts and two backoffs), and a retry after a quick failure gets
    the time left, its error naming the call's timeout."""
    silent = fake.reply(200, HEALTH, delay=2.0)
    fake.add("GET", "/v1/health", silent)
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake, timeout=0.2, retries=2).health()
    assert (info.value.code, fake.hits("GET", "/v1/health")) == ("timeout", 1)
    fake.add("GET", "/v1/model", fake.reply(503, {"code": "unavailable", "message": "loading"}), silent)
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake, timeout=0.5, retries=2).model_card()
    assert (info.value.code, fake.hits("GET", "/v1/model")) == ("timeout", 2)
    assert "no reply within 0.5 s (2 attempts)" in info.value.message


def test_backoff_grows(fake):
    fake.add("GET", "/v1/health", fake.reply(503, {"code": "unavailable", "message": "x"}))
    start = time.monotonic()
    with pytest.raises(MedSIGHTError):
        MedSIGHTClient(fake.url, retries=2, backoff=0.1).health()
    assert time.monotonic() - start >= 0.3  # 0.1 + 0.2


@pytest.mark.parametrize("call", ["ask", "ask_stream", "cancel", "upload_volume"])
def test_posts_are_never_retried(fake, call):
    busy = fake.reply(503, {"code": "unavailable", "message": "busy"})
    for path in ("/v1/ask", "/v1/jobs/j/cancel", "/v1/volumes"):
        fake.add("POST", path, busy)
    client = client_for(fake, retries=3)
    with pytest.raises(MedSIGHTError) as info:
        if call == "cancel":
            client.cancel("j")
        elif call == "upload_volume":
            client.upload_volume(np.zeros((2, 2), np.uint8))
        else:
            getattr(client, call)("v", "q")
    assert info.value.status == 503
    assert sum(r.method == "POST" for r in fake.requests) == 1


# -- streaming --------------------------------------------------------------------------------------------------
def test_stream_yields_events_incrementally_and_stops_at_done(fake):
    region = {
        "code": None,
        "label": "",
        "index": 0,
        "mask": {"shape": [2, 3], "counts": [1, 2, 3]},
        "probability": 0.5,
        "bbox": [0, 1, 0, 2],
    }
    body = sse("job", {"job_id": "j1"}) + sse("token", {"slice": 0, "text": "he"})
    body += (
        b": keep-alive\n\n" + sse("token", {"slice": 0, "text": "llo"}) + sse("region", {"slice": 0, "region": region})
    )
    body += sse("done", DONE) + sse("token", {"slice": 0, "text": "after done"})
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]  # events split across chunks
    fake.add("POST", "/v1/ask", fake.sse(chunks))
    stream = client_for(fake).ask_stream("v", "q", indices=[3], options={"max_new_tokens": 4})
    assert isinstance(stream, AskStream)
    assert json.loads(fake.requests[0].body)["stream"] is True
    assert fake.requests[0].headers["Accept"] == "text/event-stream"
    events = list(stream)
    assert [e.kind for e in events] == ["job", "token", "token", "region", "done"]
    assert "".join(e.text for e in events if e.kind == "token") == "hello"
    assert events[3].region.mask.tolist() == [[False, True, True], [False, False, False]]
    assert stream.job_id == "j1"
    assert stream.result.answers[0].text == "ok"
    assert stream.closed
    assert list(stream) == []


def test_stream_collect(fake):
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"}), sse("done", DONE)]))
    assert client_for(fake).ask_stream("v", "q").collect().job_id == "j1"


def test_stream_error_event_is_yielded_then_the_stream_ends(fake):
    error = {"code": "internal", "message": "out of memory"}
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"}), sse("error", error), sse("done", DONE)]))
    stream = client_for(fake).ask_stream("v", "q")
    events = list(stream)
    assert [e.kind for e in events] == ["job", "error"]
    assert events[-1].error.message == "out of memory"
    with pytest.raises(MedSIGHTError) as info:
        stream.raise_for_error()
    assert (info.value.code, info.value.message) == ("internal", "out of memory")


def test_stream_http_error_raises_on_the_call(fake):
    fake.add("POST", "/v1/ask", fake.reply(404, {"code": "not_found", "message": "unknown volume"}))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask_stream("v", "q")
    assert (info.value.status, info.value.code) == (404, "not_found")


def test_stream_that_is_not_an_event_stream(fake):
    fake.add("POST", "/v1/ask", fake.reply(200, DONE))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake).ask_stream("v", "q")
    assert info.value.code == "bad_response"


def test_truncated_stream_raises(fake):
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"}), sse("token", {"slice": 0, "text": "a"})]))
    stream = client_for(fake).ask_stream("v", "q")
    assert next(stream).kind == "job"
    assert next(stream).kind == "token"
    with pytest.raises(MedSIGHTError) as info:
        next(stream)
    assert info.value.code == "stream_truncated"
    assert stream.closed


def cut_off(head: bytes, body: bytes):
    """A handler that sends ``head`` (status line and headers) and part of a body, then hangs up: the engine ended
    mid-answer."""

    def handler(h) -> None:
        h.wfile.write(head + body)
        h.wfile.flush()
        h.close_connection = True

    return handler


def test_an_answer_cut_off_says_so_plainly(fake):
    """The engine ending mid-answer is named as that, with what to do: it read "the event stream ... broke:
    IncompleteRead(0 bytes read)" (a stream) and "IncompleteRead(10 bytes read, 490 more expected)" (a reply)."""
    job = sse("job", {"job_id": "j1"})
    stream_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    fake.add("POST", "/v1/ask", cut_off(stream_head, f"{len(job):x}\r\n".encode() + job + b"\r\n"))
    stream = client_for(fake).ask_stream("v", "q")
    assert next(stream).kind == "job"
    with pytest.raises(MedSIGHTError) as info:
        next(stream)
    assert (info.value.code, stream.closed) == ("stream_truncated", True)
    part = json.dumps(DONE).encode()
    fake.add("POST", "/v1/ask", cut_off(
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {2 * len(part)}\r\n\r\n".encode(),
        part))
    with pytest.raises(MedSIGHTError) as reply:
        client_for(fake).ask("v", "q")
    assert reply.value.code == "reply_truncated"
    for err in (info.value, reply.value):
        text = describe_error(err)
        assert "broke off before" in text and text.endswith(ERROR_HINTS[err.code])
        assert "IncompleteRead" not in text and "bytes read" not in text


@pytest.mark.parametrize(("sent", "words"), [(b"SSH-2.0-OpenSSH_9.6\r\n", "SSH-2.0-OpenSSH_9.6"),
                                             (b"\x00\x01binary\r\n", "binary"), (b"hello\n", "hello")])
def test_a_port_of_another_service_is_named_as_that(fake, sent, words):
    """An engine URL with the port of a program that does not speak HTTP: the error quoted that program's first line
    as the reason the engine "cannot be reached" (newline and control bytes included)."""
    fake.add("GET", "/v1/model", cut_off(sent, b""))
    with pytest.raises(MedSIGHTError) as info:
        client_for(fake, retries=0).model_card()
    assert info.value.code == "not_http" and describe_error(info.value).endswith(ERROR_HINTS["not_http"])
    assert info.value.message == (f"another program answers at {fake.url}/v1/model, not over HTTP (it sent "
                                  f"{words!r}): the engine URL names a port of some other service")


def test_closing_the_stream_hangs_up(fake):
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"})], hold=10))
    with client_for(fake).ask_stream("v", "q") as stream:
        assert next(stream).job_id == "j1"
    assert stream.closed
    assert fake.disconnected.wait(5), "the server kept writing to an open connection"


def test_stream_idle_timeout(fake):
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1"})], pause=1.0))
    stream = client_for(fake).ask_stream("v", "q", timeout=0.2)
    assert next(stream).kind == "job"
    with pytest.raises(MedSIGHTError) as info:
        next(stream)
    assert info.value.code == "timeout"
    assert stream.closed


def test_imports_only_the_standard_library_and_numpy():
    import subprocess
    import sys
    from pathlib import Path

    package_root = Path(__file__).resolve().parents[2] / "MedSIGHTSlicer"
    # Where each new top-level module comes from (sys.stdlib_module_names is 3.10+; Slicer 5.8 runs 3.9).
    code = (
        "import sys, sysconfig; before = set(sys.modules); import MedSIGHTSlicerLib; "
        "std = sysconfig.get_paths()['stdlib']; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'numpy', 'MedSIGHTSlicerLib'}; "
        "where = {m: getattr(sys.modules.get(m), '__file__', None) or '' for m in new}; "
        "print(' '.join(sorted(m for m, f in where.items() if f and not (f.startswith(std) "
        "and 'site-packages' not in f))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=package_root, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == []


def _openssl(*args: str) -> None:
    import subprocess

    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_an_untrusted_certificate_names_where_trusted_ones_are_read(tmp_path, monkeypatch):
    """An engine behind an HTTPS proxy whose certificate a hospital's own authority signed: Slicer's launcher points
    SSL_CERT_FILE at Slicer.crt, so that authority is not trusted even when the operating system trusts it, and the
    error did not say where the trusted certificates come from. It names the file; that file decides."""
    import shutil
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    ca, other = tmp_path / "ca.pem", tmp_path / "other.pem"
    for cert, name in ((ca, "Hospital CA"), (other, "Someone else")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(cert.with_suffix(".key")),
                 "-out", str(cert), "-days", "2", "-subj", f"/CN={name}")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "engine.key"),
             "-out", str(tmp_path / "engine.csr"), "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", str(tmp_path / "engine.csr"), "-CA", str(ca), "-CAkey",
             str(ca.with_suffix(".key")), "-CAcreateserial", "-out", str(tmp_path / "engine.pem"), "-days", "2",
             "-extfile", str(tmp_path / "san.cnf"))

    class Engine(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(HEALTH).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "engine.pem"), str(tmp_path / "engine.key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    client = MedSIGHTClient(f"https://127.0.0.1:{server.server_address[1]}", retries=0, timeout=5)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(other))
        with pytest.raises(MedSIGHTError) as info:
            client.health()
        assert info.value.code == "tls_error"
        assert f"the certificates trusted here are those in {other}" in info.value.message
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        assert client.health().model == HEALTH["model"]
    finally:
        server.shutdown()
        server.server_close()
