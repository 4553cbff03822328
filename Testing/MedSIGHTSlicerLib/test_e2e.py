"""The client against the real engine server (tiny random-weight model on the CPU) and a real MR volume."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

# Gate while the server is being written; remove once medsight.server.app has landed.
import medsight
import medsight.server.app
from medsight_testing.live_server import live_server
from MedSIGHTSlicerLib.client import ERROR_HINTS, MedSIGHTClient, MedSIGHTError, describe_error
from MedSIGHTSlicerLib.protocol import npy_bytes

TOKEN = "e2e-secret"
INDICES = [40, 47, 54]
OPTIONS = {"max_new_tokens": 12, "no_code_fallback": True}
UNKNOWN_ID = "0" * 64


@pytest.fixture(scope="module")
def secured_url(engine):
    with live_server(medsight.server.app.create_app(engine, token=TOKEN)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return MedSIGHTClient(url, timeout=120)


@pytest.fixture(scope="module")
def mni():
    """The MNI152 T1 template (2 mm) as (k, j, i) float32 voxels with LPS geometry, and its RAS affine."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=2)
    voxels = np.ascontiguousarray(np.asarray(image.get_fdata(), np.float32).transpose(2, 1, 0))
    ras = np.asarray(image.affine, float)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return {"voxels": voxels, "spacing": spacing, "origin": lps[:3, 3], "direction": direction, "ras": ras}


@pytest.fixture(scope="module")
def volume(client, mni):
    return client.upload_volume(mni["voxels"], mni["spacing"], mni["origin"], mni["direction"], modality="MR")


def test_health_and_model_card(client):
    health = client.health()
    assert health.status == "ok"
    assert health.device == "cpu"
    card = client.model_card()
    assert isinstance(card.random_weights, bool)
    assert card.parameters > 0
    assert card.config


def test_upload_and_volume_info(client, volume, mni):
    assert len(volume.volume_id) == 64
    assert volume.shape == mni["voxels"].shape == (95, 117, 99)
    assert volume.modality == "MR"
    assert volume.slices["axial"] == 95
    assert client.volume_info(volume.volume_id) == volume
    again = client.upload_volume(mni["voxels"], mni["spacing"], mni["origin"], mni["direction"], modality="MR")
    assert again.volume_id == volume.volume_id


def test_ask_three_axial_slices(client, volume, mni):
    result = client.ask(volume.volume_id, "Where is the brain?", indices=INDICES, options=OPTIONS)
    assert [a.index for a in result.answers] == INDICES
    assert not result.cancelled
    rows, cols = volume.shape[1], volume.shape[2]
    for answer in result.answers:
        assert answer.plane == "axial"
        assert answer.regions, "no_code_fallback guarantees at least one region"
        for region in answer.regions:
            assert region.mask.shape == (rows, cols)
            assert region.mask.dtype == bool
        # Every pixel of axial slice k lies at the slice's superior coordinate in RAS.
        corners = np.array([[0, 0, 0, 1], [cols - 1, 0, 0, 1], [0, rows - 1, 0, 1], [cols - 1, rows - 1, 0, 1]])
        world = corners @ answer.slice_to_ras.T
        expected_s = (mni["ras"] @ [0, 0, answer.index, 1])[2]
        np.testing.assert_allclose(world[:, 2], expected_s, atol=1e-3)


def test_stream_tokens_then_regions(client, volume):
    events = []
    with client.ask_stream(volume.volume_id, "Where is the brain?", indices=INDICES, options=OPTIONS) as stream:
        events = list(stream)
    kinds = [e.kind for e in events]
    assert kinds[0] == "job"
    assert kinds[-1] == "done"
    assert "token" in kinds and "region" in kinds
    assert max(i for i, k in enumerate(kinds) if k == "token") < min(i for i, k in enumerate(kinds) if k == "region")
    result = stream.result
    assert result.job_id == stream.job_id == events[0].job_id
    rows, cols = volume.shape[1], volume.shape[2]
    for position, answer in enumerate(result.answers):
        streamed = "".join(e.text for e in events if e.kind == "token" and e.slice == position)
        assert streamed == answer.text
        regions = [e.region for e in events if e.kind == "region" and e.slice == position]
        assert len(regions) == len(answer.regions)
        for region, final in zip(regions, answer.regions):  # lengths checked above
            assert (region.code, region.label, region.index) == (final.code, final.label, final.index)
            assert region.mask is None  # each mask travels once, in the done event
            assert final.mask.shape == (rows, cols)


def test_token_is_required_when_the_server_has_one(secured_url):
    with pytest.raises(MedSIGHTError) as info:
        MedSIGHTClient(secured_url).model_card()
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    with pytest.raises(MedSIGHTError) as info:
        MedSIGHTClient(secured_url, token="wrong").model_card()
    assert info.value.status == 401
    assert MedSIGHTClient(secured_url, token=TOKEN).model_card().parameters > 0


def test_connection_check_tells_what_to_do_without_the_right_token(secured_url):
    """"Test connection" to an engine that demands a token, without one and with a wrong one: the engine's 401 and
    what to do about it (it used to show only the engine's "missing or wrong bearer token")."""
    import time

    from MedSIGHTSlicerLib.client import ERROR_HINTS
    from MedSIGHTSlicerLib.connection_check import ConnectionCheck

    def check(token):
        checker = ConnectionCheck()
        assert checker.start(MedSIGHTClient(secured_url, token=token), timeout=30)
        while (outcome := checker.poll()) is None:
            time.sleep(0.01)
        return outcome

    for token in (None, "wrong"):
        outcome = check(token)
        assert not outcome.ok and "(HTTP 401)" in outcome.text
        assert outcome.text.endswith(ERROR_HINTS["unauthorized"])
    assert check(TOKEN).ok


def test_unknown_volume_is_404(client):
    with pytest.raises(MedSIGHTError) as info:
        client.volume_info(UNKNOWN_ID)
    assert info.value.status == 404
    assert info.value.message
    # Asking about a volume the engine does not hold is a bad request body (422), not a missing URL.
    with pytest.raises(MedSIGHTError) as info:
        client.ask(UNKNOWN_ID, "Where?")
    assert (info.value.status, info.value.code) == (422, "unknown_volume")
    with pytest.raises(MedSIGHTError) as info:
        client.ask_stream(UNKNOWN_ID, "Where?")
    assert (info.value.status, info.value.code) == (422, "unknown_volume")


def test_bad_request_is_rejected(client, volume):
    with pytest.raises(MedSIGHTError) as info:
        client.ask(volume.volume_id, "Where?", indices=[10_000])
    assert info.value.status in (400, 422)
    with pytest.raises(MedSIGHTError) as info:
        client.ask(volume.volume_id, "Where?", options={"no_such_option": 1})
    assert info.value.status == 422


def test_cancel_a_streamed_job(client, volume):
    options = {"max_new_tokens": 2048, "no_code_fallback": True}
    with client.ask_stream(volume.volume_id, "Describe everything.", indices=INDICES, options=options) as stream:
        first = next(stream)
        assert first.kind == "job"
        assert client.cancel(first.job_id).cancelled is True
        result = stream.collect()
    assert result.cancelled is True
    assert len(result.answers) == len(INDICES)


def test_cancel_unknown_job_is_404(client):
    with pytest.raises(MedSIGHTError) as info:
        client.cancel("no-such-job")
    assert info.value.status == 404


class RequestCounter:
    """ASGI wrapper counting the requests and body bytes the engine receives, by method and path."""

    def __init__(self, app) -> None:
        self.app, self.requests, self.body_bytes = app, Counter(), Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = (scope["method"], scope["path"])
        self.requests[key] += 1

        async def counting_receive():
            message = await receive()
            self.body_bytes[key] += len(message.get("body", b""))
            return message

        return await self.app(scope, counting_receive, send)


def test_a_volume_over_the_engines_upload_limit_is_refused_before_one_byte_is_sent(engine, mni):
    """The engine publishes its limits in /v1/health; the client refuses a larger volume itself, with the 413's
    hint, instead of sending all of it (up to a GiB) to be refused. The limit is the MNI volume's exact size, so the
    two sides must count alike: the MNI volume still uploads, one more slice does not."""
    fits = mni["voxels"]
    over = np.concatenate([fits, fits[:1]])
    limit = len(npy_bytes(fits))
    counted = RequestCounter(medsight.server.app.create_app(engine, max_upload_bytes=limit))
    upload = ("POST", "/v1/volumes")
    with live_server(counted) as base_url:
        client = MedSIGHTClient(base_url, timeout=120)
        with pytest.raises(MedSIGHTError) as refused:
            client.upload_volume(over, mni["spacing"], mni["origin"], mni["direction"], modality="MR")
        assert (counted.requests[upload], counted.body_bytes[upload]) == (0, 0)
        assert refused.value.code == "too_large"
        text = describe_error(refused.value)
        assert f"{len(npy_bytes(over)):,} bytes" in text and f"upload limit of {limit:,} bytes" in text
        assert text.endswith(ERROR_HINTS["too_large"])

        info = client.upload_volume(fits, mni["spacing"], mni["origin"], mni["direction"], modality="MR")
        assert info.shape == fits.shape
        assert (counted.requests[upload], counted.body_bytes[upload]) == (1, limit)
        assert counted.requests[("GET", "/v1/health")] == 1  # one look-up for both uploads, none per upload


def test_a_volume_over_the_engines_voxel_limit_is_refused_before_it_is_sent(engine, mni):
    fits = mni["voxels"]
    counted = RequestCounter(medsight.server.app.create_app(engine, max_voxels=fits.size - 1))
    with live_server(counted) as base_url:
        with pytest.raises(MedSIGHTError, match=f"has {fits.size:,} voxels, over the engine's limit of "
                           f"{fits.size - 1:,}"):
            MedSIGHTClient(base_url).upload_volume(fits, mni["spacing"], mni["origin"], mni["direction"])
        assert counted.requests[("POST", "/v1/volumes")] == 0


def test_an_ask_over_the_engines_body_limit_is_refused_before_it_is_sent(engine):
    """The engine reads no ask body over its limit (the longest conversation its model's prompt can hold) and
    answered one with 413, a limit no client could know before. /v1/health now publishes it, at the engine's real
    threshold, and the client refuses a longer conversation itself, naming the limit, without sending it."""
    import httpx

    counted = RequestCounter(medsight.server.app.create_app(engine))
    ask = ("POST", "/v1/ask")
    with live_server(counted) as base_url:
        client = MedSIGHTClient(base_url, timeout=120)
        limit = client.health().max_ask_body_bytes
        assert limit is not None
        for size, status in ((limit + 1, 413), (limit, 422)):  # padded JSON: read (then refused as no ask) or not
            reply = httpx.post(f"{base_url}/v1/ask", content=b"{}".ljust(size), timeout=120,
                               headers={"content-type": "application/json"})
            assert reply.status_code == status, reply.text[:200]
        sent = counted.requests[ask]
        volume_id = client.upload_volume(np.zeros((2, 8, 8), np.int16)).volume_id
        turns = limit // 16_000 + 1  # messages of 16,000 characters: together over the limit
        conversation = [("user" if i % 2 == 0 else "assistant", "x" * 16_000) for i in range(turns)]
        with pytest.raises(MedSIGHTError) as refused:
            client.ask(volume_id, conversation)
        with pytest.raises(MedSIGHTError, match="too_large"):
            client.ask_stream(volume_id, conversation)
        assert counted.requests[ask] == sent  # neither was sent
        assert refused.value.code == "too_large"
        assert f"over the engine's limit of {limit:,} bytes for an ask" in describe_error(refused.value)

        # Limits known from an older health (none for asks): the engine's own 413 once, then the limits are fetched
        # again and the next ask is refused unsent (every one was sent to its 413 before).
        client._health = dataclasses.replace(client.health(), max_ask_body_bytes=None)
        health = counted.requests[("GET", "/v1/health")]
        for status in (413, None):
            with pytest.raises(MedSIGHTError) as refused:
                client.ask(volume_id, conversation)
            assert (refused.value.status, refused.value.code) == (status, "too_large")
            assert f"over the engine's limit of {limit:,} bytes for an ask" in refused.value.message
        assert counted.requests[ask] == sent + 1
        assert counted.requests[("GET", "/v1/health")] == health + 2  # after the 413; before refusing the next
