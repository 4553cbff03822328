"""The audit trail: one JSON line per job with the model, weights and settings that made each mask, and nothing
that identifies the patient or repeats the question."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pydicom.data
import pytest
from fastapi import FastAPI

from medsight.imaging import read_volume
from medsight.server.app import create_app
from medsight.server.audit import weights_sha256
from medsight_testing.arrays import npy
from medsight_testing.disk import file_size_limit
from medsight_testing.live_server import live_server
from MedSIGHTSlicerLib.protocol import SSEParser

PATIENT_NAME, PATIENT_ID = "Quillfeather^Araminta", "AUDIT-PID-7741"
PHRASE = "the zebra-striped nodule Araminta mentioned"
SLICES = 3  # of `segment_all`'s volume


@pytest.fixture
def named_series(tmp_path):
    """pydicom's five-slice CT series, its header naming a (made-up) patient."""
    source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    folder = tmp_path / "ct"
    shutil.copytree(source, folder)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(path)
    return folder


def test_audit_has_one_line_per_job_and_no_identifiers_or_question(engine, named_series, tmp_path):
    volume = read_volume(named_series)
    assert str(pydicom.dcmread(volume.source_files[0]).PatientName) == PATIENT_NAME
    audit = tmp_path / "audit.jsonl"
    app = create_app(engine, model_name="tiny", audit_path=str(audit))
    params = {"modality": volume.modality, "spacing": ",".join(map(str, volume.spacing)),
              "origin": ",".join(map(str, volume.origin)), "direction": ",".join(map(str, volume.direction.ravel()))}
    question = [{"role": "user", "content": f"Patient {PATIENT_NAME} ({PATIENT_ID}): please segment {PHRASE}."}]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/volumes", content=npy(volume.array), params=params,
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        vid = r.json()["volume_id"]
        ask = {"volume_id": vid, "messages": question, "slices": {"plane": "axial", "indices": [1, 3]},
               "options": {"max_new_tokens": 24, "repetition_penalty": 1.0, "seed": 5}}
        plain = c.post("/v1/ask", json=ask).json()
        with c.stream("POST", "/v1/ask", json={**ask, "stream": True, "slices": {"plane": "coronal",
                                                                                  "indices": [0]}}) as s:
            s.read()
        cancelled_id = None
        with c.stream("POST", "/v1/ask", json={**ask, "options": {"max_new_tokens": 2000}}) as s:
            cancelled_id = s.headers["x-job-id"]
            c.post(f"/v1/jobs/{cancelled_id}/cancel")
            s.read()
        assert c.post("/v1/ask", json={**ask, "slices": {"indices": [99]}}).status_code == 422  # not a job
    text = audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3, text
    for forbidden in (PATIENT_NAME, "Quillfeather", "Araminta", PATIENT_ID, "zebra", PHRASE):
        assert forbidden not in text
    first = lines[0]
    assert set(first) == {"time", "job_id", "model", "volume_sha256", "plane", "slices", "options", "regions",
                          "queued_s", "duration_s", "outcome"}
    assert first["job_id"] == plain["job_id"] and first["outcome"] == "completed"
    assert first["model"] == {"name": "tiny", "version": first["model"]["version"],
                              "weights_sha256": weights_sha256(engine.model)}
    assert first["volume_sha256"] == vid and first["plane"] == "axial" and first["slices"] == [1, 3]
    assert first["options"]["max_new_tokens"] == 24 and first["options"]["seed"] == 5
    expected = [{"slice": a["index"], "code": r["code"], "label": r["label"]}
                for a in plain["answers"] for r in a["regions"]]
    assert first["regions"] == expected and first["duration_s"] > 0
    assert lines[1]["plane"] == "coronal" and lines[1]["slices"] == [0]
    assert lines[2]["job_id"] == cancelled_id and lines[2]["outcome"] == "cancelled"
    assert np.all([line["time"].endswith("+00:00") for line in lines])


@contextlib.contextmanager
def audited_engine(engine, audit: Path) -> Iterator[tuple[httpx.Client, dict]]:
    """A live engine keeping its audit trail in `audit`: a client, and an ask about a volume uploaded to it."""
    ask = {"messages": [{"role": "user", "content": "Where?"}], "options": {"max_new_tokens": 3}}
    with live_server(create_app(engine, model_name="tiny", audit_path=str(audit))) as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        image = npy(np.zeros((2, 16, 16), np.int16))
        ask["volume_id"] = c.post("/v1/volumes", content=image, headers={"content-type": "application/octet-stream"}
                                  ).json()["volume_id"]
        yield c, ask


def test_an_audit_trail_that_cannot_be_written_withholds_the_answer_saying_why(engine, tmp_path):
    """On a full disk the ask failed as "the engine failed: OSError": nothing said the audit trail was the cause."""
    audit = tmp_path / "audit.jsonl"
    with audited_engine(engine, audit) as (c, ask):
        first = c.post("/v1/ask", json=ask)
        assert first.status_code == 200
        with file_size_limit(audit.stat().st_size + 10):  # room for a tenth of a line
            full = c.post("/v1/ask", json=ask)
            streamed = list(SSEParser().feed(c.post("/v1/ask", json={**ask, "stream": True}).content))
        after = c.post("/v1/ask", json=ask)
    assert full.json()["code"] == "audit_failed", full.text
    assert streamed[-1][0] == "error" and json.loads(streamed[-1][1])["code"] == "audit_failed", streamed[-1]
    assert "audit trail could not be written (File too large)" in full.json()["message"]
    assert after.status_code == 200 and len(after.json()["answers"]) == 1, after.text
    # The failed line left nothing behind: the trail holds exactly the two answers given, each line whole.
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["job_id"] for line in lines] == [first.headers["x-job-id"], after.headers["x-job-id"]]


@pytest.mark.parametrize(("error", "code", "message"), [
    (RuntimeError("out of memory"), "internal_error", "the engine failed: RuntimeError"),
    (ValueError("slice 3 is blank"), "invalid_request", "slice 3 is blank"),
])
def test_an_ask_that_failed_keeps_its_own_error_when_the_audit_trail_cannot_be_written(engine, tmp_path, monkeypatch,
                                                                                      caplog, error, code, message):
    """An ask that failed sends no answer, so the audit failure must not replace its error: it reached the client as
    audit_failed, "the answer is withheld", hiding the real failure."""
    audit = tmp_path / "audit.jsonl"
    with audited_engine(engine, audit) as (c, ask):
        assert c.post("/v1/ask", json=ask).status_code == 200
        size = audit.stat().st_size

        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(engine, "ask", fail)  # a failure while the job runs, after admission
        with file_size_limit(size + 10):  # room for a tenth of a line
            failed = c.post("/v1/ask", json=ask)
    assert (failed.status_code, failed.json()["code"], failed.json()["message"]) == (200, code, message), failed.text
    assert audit.stat().st_size == size  # the write was tried, failed, and its torn part was removed
    assert "the audit trail could not be written (File too large)" in caplog.text


def hold_mapping(engine, monkeypatch, hold_at: int | None) -> tuple[list[int], threading.Event, list[threading.Event]]:
    """Hooks on the engine's own ask and mask mapping: `mapped` gets each slice's region count; once the `hold_at`-th
    slice is mapped, `held` is set and the mapping waits (30 s at most) until the ask is abandoned. Returns
    (mapped, held, the asks' abandon flags)."""
    abandoned: list[threading.Event] = []
    mapped: list[int] = []
    held = threading.Event()
    ask, regions_of = engine.ask, engine._regions

    def asking(*args, **kwargs):
        abandoned.append(kwargs["abandon"])
        return ask(*args, **kwargs)

    def mapping(*args, **kwargs):
        regions = regions_of(*args, **kwargs)
        mapped.append(len(regions))
        if len(mapped) == hold_at:
            held.set()
            abandoned[0].wait(30)
        return regions

    monkeypatch.setattr(engine, "ask", asking)
    monkeypatch.setattr(engine, "_regions", mapping)
    return mapped, held, abandoned


@pytest.mark.parametrize("stream", [True, False])
def test_an_ask_stopped_by_the_engine_audits_exactly_the_regions_it_sent(engine, tmp_path, monkeypatch, stream):
    """The engine stops (its grace over) while an ask maps the masks of its second slice: the response has stopped
    sending by then ("stopping"), yet the regions of that slice were listed in the audit trail, sent to nobody
    (7357 audited, 7271 sent, last session); a plain ask, which sends its regions only in its answer, listed all it had
    mapped. The line now lists the "region" events the client received, in order: none for a plain ask."""
    audit = tmp_path / "audit.jsonl"
    mapped, second_slice, _ = hold_mapping(engine, monkeypatch, 2)
    volume = np.random.default_rng(0).integers(0, 1000, (3, 32, 32)).astype(np.int16)
    received: list[tuple[str, dict]] = []
    with live_server(create_app(engine, model_name="tiny", audit_path=str(audit)), grace_s=0.2) as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            volume_id = c.post("/v1/volumes", content=npy(volume),
                               headers={"content-type": "application/octet-stream"}).json()["volume_id"]
        ask_body = {"volume_id": volume_id, "messages": [{"role": "user", "content": "Segment everything."}],
                    "slices": {"plane": "axial", "indices": list(range(volume.shape[0]))},
                    "options": {"max_new_tokens": 24, "seed": 1}, "stream": stream}

        def read() -> None:
            parser = SSEParser()
            with httpx.stream("POST", f"{url}/v1/ask", json=ask_body, timeout=120) as s:
                if not stream:
                    received.append(("error", json.loads(s.read())))
                    return
                for chunk in s.iter_bytes():
                    received.extend((kind, json.loads(data)) for kind, data in parser.feed(chunk))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert second_slice.wait(120)
    reader.join(30)  # leaving the block stopped the engine: the ask ends with its "stopping" error
    assert received[-1] == ("error", {"code": "stopping", "message": received[-1][1]["message"]}), received[-1:]
    indices = list(range(volume.shape[0]))
    sent = [{"slice": indices[data["slice"]], "code": data["region"]["code"], "label": data["region"]["label"]}
            for kind, data in received if kind == "region"]
    line = json.loads(audit.read_text())
    assert line["outcome"] == "disconnected" and len(mapped) == 2 and mapped[1] > 0  # the 2nd slice had regions
    assert line["regions"] == sent and len(sent) == (mapped[0] if stream else 0)  # before: the 2nd slice's too


def hang_up(url: str, body: dict, ready: Callable[[list[dict]], bool]) -> list[dict]:
    """Ask over a raw connection, read until `ready(regions received)` says so, then hang up: the regions received
    (the data of the stream's "region" events; none for a plain ask)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    received = b""
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(data), data))
        client.settimeout(0.05)
        give_up = time.monotonic() + 120  # a hang guard, not a speed requirement
        while time.monotonic() < give_up:
            with contextlib.suppress(TimeoutError):
                received += client.recv(65536)
            # Each event goes out whole in one chunk of the chunked body: its text is never split.
            regions = [json.loads(m) for m in re.findall(rb"event: region\ndata: (.+)\n\n", received)]
            if ready(regions):
                return regions
    raise AssertionError(f"the client never got to hang up: {received[-300:]!r}")


def audit_line(audit: Path) -> dict:
    """The trail's one line, once written (a job stopped by its client's leaving ends, and is audited, soon)."""
    give_up = time.monotonic() + 30
    while not audit.read_text() and time.monotonic() < give_up:
        time.sleep(0.02)
    [line] = audit.read_text().splitlines()
    return json.loads(line)


@contextlib.contextmanager
def segment_all(engine, audit: Path, stream: bool) -> Iterator[tuple[str, dict, FastAPI]]:
    """A live engine auditing to `audit`, an ask about every slice of a small random volume, and the engine's app."""
    volume = np.random.default_rng(0).integers(0, 1000, (SLICES, 32, 32)).astype(np.int16)
    app = create_app(engine, model_name="tiny", audit_path=str(audit))
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            volume_id = c.post("/v1/volumes", content=npy(volume),
                               headers={"content-type": "application/octet-stream"}).json()["volume_id"]
        yield url, {"volume_id": volume_id, "messages": [{"role": "user", "content": "Segment everything."}],
                    "slices": {"plane": "axial", "indices": list(range(volume.shape[0]))},
                    "options": {"max_new_tokens": 24, "seed": 1}, "stream": stream}, app

def audited(regions: list[dict], indices: list[int]) -> list[dict]:
    """Streamed "region" events as the trail lists them."""
    return [{"slice": indices[r["slice"]], "code": r["region"]["code"], "label": r["region"]["label"]}
            for r in regions]


@pytest.mark.parametrize("stream", [True, False])
def test_an_ask_whose_client_left_while_its_last_slice_was_mapped_is_audited_as_disconnected(
        engine, tmp_path, monkeypatch, stream):
    """A client gone while the masks of the ask's last slice were mapped was audited "completed": no later slice was
    left to see the abandon, so the answer did not say it was cut short, though nothing more went out."""
    audit = tmp_path / "audit.jsonl"
    mapped, last_slice, abandoned = hold_mapping(engine, monkeypatch, SLICES)
    with segment_all(engine, audit, stream) as (url, body, _):
        # A stream hangs up once it has the earlier slices' "region" events: all that were sent.
        got = hang_up(url, body, lambda regions: last_slice.is_set() and len(regions) == sum(mapped[:-1]) * stream)
        line = audit_line(audit)
    assert abandoned[0].is_set() and len(mapped) == len(body["slices"]["indices"])
    assert line["outcome"] == "disconnected", (line["outcome"], len(line["regions"]), len(got))  # before: "completed"
    assert line["regions"] == audited(got, body["slices"]["indices"]) and len(got) == sum(mapped[:-1]) * stream


@pytest.mark.parametrize("stream", [True, False])
def test_an_ask_whose_client_left_after_its_job_ended_audits_what_went_out(engine, tmp_path, monkeypatch, caplog,
                                                                          stream):
    """The job has ended when its client leaves, before the answer with the masks went out: its line, written at the
    job's end, said "completed" (a stream: its 50 "region" events sent, no masks) and a plain ask listed every region
    (50, none sent). The line is now written as the answer goes out, or as its client is found gone."""
    caplog.set_level(logging.INFO, logger="medsight.server")
    audit = tmp_path / "audit.jsonl"
    ended = threading.Event()
    mapped, _, _ = hold_mapping(engine, monkeypatch, None)
    with segment_all(engine, audit, stream) as (url, body, app):
        submit = app.state.jobs.submit

        def submitting(work):  # the job's own work; once it has ended, held until its client is found gone
            def working(job):
                try:
                    return work(job)
                finally:
                    ended.set()
                    job.abandoned.wait(30)

            return submit(working)

        monkeypatch.setattr(app.state.jobs, "submit", submitting)
        # A stream hangs up once it has every "region" event, the answer's masks (its "done") not yet.
        got = hang_up(url, body, lambda regions: ended.is_set() and len(regions) == sum(mapped) * stream)
        line = audit_line(audit)
    assert sum(mapped) > 0 and len(mapped) == len(body["slices"]["indices"])
    assert line["outcome"] == "disconnected", (line["outcome"], len(line["regions"]), len(got))  # before: "completed"
    assert line["regions"] == audited(got, body["slices"]["indices"])  # before: a plain ask listed every region
    assert len(got) == sum(mapped) * stream
    assert f"job {line['job_id']}: the client left before the answer went out" in caplog.text
