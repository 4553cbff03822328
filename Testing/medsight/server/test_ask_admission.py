"""What the engine would refuse is refused before an ask is admitted: a 422 with the engine's message, never a 200
whose body is an error (real server, tiny model). A job that still fails after its 200 reaches the Slicer client as
the engine's own error. Uploads: impossible .npy shapes, misspelt query parameters, 2D images and their planes."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from medsight.config import get_preset
from medsight.engine import Engine
from medsight.model.loading import build_model
from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError
from MedSIGHTSlicerLib.protocol import VolumeInfo

NPY = {"content-type": "application/octet-stream"}
JSON = {"content-type": "application/json"}
QUESTION = [{"role": "user", "content": "Please segment the white matter."}]


def _upload(server: str, array: np.ndarray, **params: str) -> dict:
    reply = httpx.post(f"{server}/v1/volumes", content=npy(array), params=params, headers=NPY, timeout=60)
    assert reply.status_code == 201, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def mr_id(server) -> str:
    return _upload(server, np.random.default_rng(1).integers(0, 400, (3, 20, 18)).astype(np.int16),
                   modality="MR")["volume_id"]


@pytest.fixture(scope="module")
def ct_id(server) -> str:
    return _upload(server, np.random.default_rng(2).integers(-1000, 400, (3, 20, 18)).astype(np.int16),
                   modality="CT")["volume_id"]


# -- asks the job used to refuse after its 200 ---------------------------------------------------------------------
@pytest.mark.parametrize(("volume", "extra", "code", "words"), [
    ("ct", {"window": {"preset": "lungs"}}, "invalid_window", "unknown window preset 'lungs'"),
    ("mr", {"window": {"preset": "lung"}}, "invalid_window", "needs CT, not MR"),
    ("ct", {"window": {"preset": "lung", "center": 40, "width": 400}}, "invalid_window", "not both"),
    ("ct", {"window": {"center": -1e35, "width": 10}}, "invalid_window", "beyond"),
    ("mr", {"options": {"seed": 99999999999999999999999, "do_sample": True}}, "invalid_request", "options.seed"),
    ("mr", {"messages": [{"role": "user", "content": "why " * 3750}]}, "invalid_request", "embeddings long"),
    ("mr", {"messages": [*QUESTION, {"role": "assistant", "content": "Sure."}]}, "invalid_request",
     "ends with a message of role 'assistant'"),
], ids=["unknown-preset", "ct-preset-on-mr", "preset-and-center", "huge-center", "seed-overflow", "long-question",
        "answer-last"])
def test_what_the_engine_refuses_is_a_422_before_the_job(server, mr_id, ct_id, volume, extra, code, words):
    ask = {"volume_id": ct_id if volume == "ct" else mr_id, "messages": QUESTION, "options": {"max_new_tokens": 2},
           **extra}
    reply = httpx.post(f"{server}/v1/ask", json=ask, timeout=60)
    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == code and words in reply.json()["message"], reply.text
    assert "x-job-id" not in reply.headers  # refused at admission: no job was queued


@pytest.mark.parametrize("window", ['{"center":NaN,"width":400}', '{"center":40,"width":Infinity}',
                                   '{"center":1e999,"width":400}'])
def test_non_finite_window_is_422(server, ct_id, window):
    body = f'{{"volume_id":"{ct_id}","messages":[{{"role":"user","content":"Where?"}}],"window":{window}}}'
    reply = httpx.post(f"{server}/v1/ask", content=body, headers=JSON, timeout=60)
    assert reply.status_code == 422 and "finite" in reply.json()["message"], reply.text


def test_nan_view_is_still_refused(server, mr_id):
    body = (f'{{"volume_id":"{mr_id}","messages":[{{"role":"user","content":"Where?"}}],"slices":{{"view":'
            '[[NaN,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]}}')
    reply = httpx.post(f"{server}/v1/ask", content=body, headers=JSON, timeout=60)
    assert reply.status_code == 422 and "finite 4x4" in reply.json()["message"], reply.text


def test_valid_windows_and_seeds_still_answer(server, ct_id):
    for extra in ({"window": {"preset": "Lung"}}, {"window": {"preset": "auto"}},
                  {"window": {"center": 40, "width": 400}}, {"options": {"seed": 2**64 - 1, "do_sample": True}}):
        ask = {"volume_id": ct_id, "messages": QUESTION, **extra}
        ask["options"] = {"max_new_tokens": 2, **ask.get("options", {})}
        reply = httpx.post(f"{server}/v1/ask", json=ask, timeout=60)
        assert reply.status_code == 200 and reply.json()["answers"], (extra, reply.text)


@pytest.mark.parametrize(("value", "modality", "window"), [(1e31, "MR", None), (-1e31, "CT", {"preset": "auto"})],
                         ids=["mr-default", "ct-auto"])
def test_a_volume_whose_own_window_cannot_show_it_is_a_422_before_the_job(server, value, modality, window):
    """A constant volume beyond +-1e30 has a percentile window no 8-bit display can use: the ask was admitted and
    failed after its 200. An explicit window still shows it."""
    array = np.full((2, 12, 10), value, np.float32)
    volume_id = _upload(server, array, modality=modality)["volume_id"]
    ask = {"volume_id": volume_id, "messages": QUESTION, "options": {"max_new_tokens": 2},
           **({"window": window} if window else {})}
    # The quick checks come before the window (whose first read is of the whole volume): a slice out of range is
    # named as such, where it was refused for the window.
    outside = {"plane": "axial", "indices": [len(array)]}
    reply = httpx.post(f"{server}/v1/ask", json={**ask, "slices": outside}, timeout=60)
    assert (reply.status_code, reply.json()["code"]) == (422, "invalid_request"), reply.text
    assert f"axial slice index {len(array)} is out of range 0..{len(array) - 1}" in reply.json()["message"]
    reply = httpx.post(f"{server}/v1/ask", json=ask, timeout=60)
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_window", reply.text
    assert "the volume's values give the window" in reply.json()["message"] and "x-job-id" not in reply.headers
    reply = httpx.post(f"{server}/v1/ask", json={**ask, "window": {"center": 0, "width": 100}}, timeout=60)
    assert reply.status_code == 200 and len(reply.json()["answers"]) == 1, reply.text


def test_new_tokens_past_the_language_models_positions_are_a_422_before_the_job():
    """The schema's cap (2048) is far below the presets' positions; a model with fewer got its ask admitted, and
    the answer ran on positions the model never saw."""
    config = get_preset("tiny")
    engine = Engine(build_model(config))
    prompt = engine.prompt_length(engine._prompt(QUESTION[0]["content"]))
    config.llm.max_position_embeddings = prompt + 40
    with live_server(create_app(Engine(build_model(config)), model_name="few-positions")) as url:
        volume_id = _upload(url, np.zeros((2, 16, 16), np.int16), modality="MR")["volume_id"]
        replies = [httpx.post(f"{url}/v1/ask", json={"volume_id": volume_id, "messages": QUESTION,
                                                     "options": {"max_new_tokens": n}}, timeout=60) for n in (41, 40)]
    assert replies[0].status_code == 422 and "x-job-id" not in replies[0].headers, replies[0].text[:300]
    assert "past the language model's" in replies[0].json()["message"]
    assert replies[1].status_code == 200 and len(replies[1].json()["answers"]) == 1, replies[1].text[:300]


# -- a job that fails after its 200 ----------------------------------------------------------------------------------
def test_a_job_failing_after_its_200_reaches_the_client_as_the_engines_error(engine, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "ask", fail)  # a genuine runtime failure, after admission
    with live_server(create_app(engine, model_name="tiny")) as url:
        client = MedSIGHTClient(url, timeout=60)
        volume_id = client.upload_volume(np.zeros((2, 16, 16), np.int16), modality="MR").volume_id
        with pytest.raises(MedSIGHTError) as plain:
            client.ask(volume_id, "Where is the brain?")
        with client.ask_stream(volume_id, "Where is the brain?") as stream, pytest.raises(MedSIGHTError) as streamed:
            stream.collect()
    for err in (plain.value, streamed.value):
        assert (err.status, err.code) == (200, "internal_error"), repr(err)
        assert err.message == "the engine failed: RuntimeError"


# -- uploads ---------------------------------------------------------------------------------------------------------
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(-1, -5, 5), (-1, 5, 5), (2, 3, -4)])
def test_negative_npy_dimensions_are_422_naming_the_shape(server, shape):
    reply = httpx.post(f"{server}/v1/volumes", content=_npy_header(shape) + b"\0" * 100, headers=NPY)
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_image", reply.text
    assert str(shape) in reply.json()["message"] and "negative" in reply.json()["message"]


@pytest.mark.parametrize(("query", "words"), [
    ("spaceing=0.5,0.5,3&orgin=1,2,3", "unknown query parameter(s): orgin, spaceing"),
    ("spacing=1,1,1&spacing=0.5,0.5,3", "more than once: spacing"),
])
def test_misspelt_or_repeated_query_parameters_are_422(server, query, words):
    body = npy(np.zeros((2, 8, 8), np.float32))
    reply = httpx.post(f"{server}/v1/volumes?{query}", content=body, headers=NPY)
    assert reply.status_code == 422 and words in reply.json()["message"], reply.text
    assert httpx.get(f"{server}/v1/health?verbose=1").status_code == 422


def test_a_2d_image_has_only_its_own_plane(server):
    info = _upload(server, np.random.default_rng(4).random((1, 32, 24)).astype(np.float32))
    assert info["slices"] == {"axial": 1}
    assert httpx.get(f"{server}/v1/volumes/{info['volume_id']}").json()["slices"] == {"axial": 1}
    assert VolumeInfo.from_json(info).slices == {"axial": 1}  # the Slicer client reads it
    for plane in ("coronal", "sagittal"):
        ask = {"volume_id": info["volume_id"], "messages": QUESTION, "slices": {"plane": plane, "indices": [3]}}
        reply = httpx.post(f"{server}/v1/ask", json=ask, timeout=60)
        assert reply.status_code == 422, reply.text
        assert "single 2D image: only the axial plane has slices" in reply.json()["message"]
    line = httpx.post(f"{server}/v1/volumes", content=npy(np.zeros((1, 1, 40), np.float32)), headers=NPY)
    assert line.status_code == 422 and "no plane has slices" in line.json()["message"], line.text
