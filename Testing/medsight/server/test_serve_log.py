"""What `medsight serve` prints: a line per job and upload by default (ids, sizes, timings, never the question),
fewer with --log-level warning; and a warning when other users can read the token file. How it stops with asks open."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from medsight.cli import _parser
from medsight.commands.serve import SHUTDOWN_GRACE_S, _serve_token
from medsight_testing.live_server import free_port
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError

QUESTION = "Where is the secret-looking liver?"


def _start_engine(*options: str) -> tuple[subprocess.Popen, MedSIGHTClient]:
    """`medsight serve` on the tiny model and a free port, answering health. The port is free when chosen but the
    engine binds it seconds later: if something took it meanwhile, another port is tried."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--model", "tiny", "--port",
                                    str(port), *options], stderr=subprocess.PIPE, text=True, env=env)
        client = MedSIGHTClient(f"http://127.0.0.1:{port}", timeout=60, retries=0)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            try:
                client.health()
                return process, client
            except MedSIGHTError:
                time.sleep(0.2)
        process.kill()
        err = process.communicate(timeout=30)[1]
        if "address already in use" not in err.lower():
            pytest.fail(f"the engine did not start: {err}")
    pytest.fail("no free port for the engine in 3 tries")


def _serve_and_ask(*options: str) -> str:
    """Upload a volume to a fresh engine and ask one question; the engine's stderr after it stops."""
    process, client = _start_engine(*options)
    try:
        volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
        info = client.upload_volume(volume)
        client.ask(info.volume_id, QUESTION, indices=[1], options={"max_new_tokens": 4})
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    return err


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals and permissions")
def test_jobs_are_logged_by_default_without_the_question():
    default, quiet = _serve_and_ask(), _serve_and_ask("--log-level", "warning")
    job_lines = [line for line in default.splitlines() if " job " in line]
    assert len(job_lines) == 1 and "completed" in job_lines[0], default
    assert any("volume stored" in line for line in default.splitlines()), default
    assert QUESTION not in default and "liver" not in default
    assert not [line for line in quiet.splitlines() if " job " in line or "volume stored" in line], quiet


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_a_token_file_others_can_read_is_warned_about(tmp_path, capsys):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        path.chmod(mode)
        assert _serve_token(_parser().parse_args(["serve", "--token-file", str(path)])) == "s3cret"
        err = capsys.readouterr().err
        assert ("chmod 600" in err) is warned, (oct(mode), err)
        assert "s3cret" not in err


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_stopping_with_asks_running_and_waiting_cancels_them_instead_of_running_the_queue():
    """Before the fix SIGTERM waited for every queued ask to run (20 long asks of the tiny model: 63 s; with a
    real model, minutes); now open asks get SHUTDOWN_GRACE_S, then are cancelled, and the log says so."""
    process, client = _start_engine()
    asks = 20
    try:
        volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
        vid = client.upload_volume(volume).volume_id
        body = {"volume_id": vid, "slices": {"indices": [0, 1, 2]}, "messages": [{"role": "user", "content": QUESTION}],
                "options": {"max_new_tokens": 2048, "repetition_penalty": 1.0}}  # the tiny model rarely ends early

        replies: list[str] = []

        def ask() -> None:
            with contextlib.suppress(httpx.HTTPError):  # cut by the shutdown
                replies.append(httpx.post(f"{client.base_url}/v1/ask", json=body, timeout=600).text)

        threads = [threading.Thread(target=ask, daemon=True) for _ in range(asks)]
        for thread in threads:
            thread.start()
        time.sleep(1)  # all admitted: one runs, the others wait
    finally:
        process.terminate()
        try:
            _, err = process.communicate(timeout=600)  # the old code's whole queue fits in this
        finally:
            process.kill()
    for thread in threads:
        thread.join(timeout=30)  # the engine has exited: every ask has its reply or its error
    outcomes = [line.rsplit(", ", 2)[-2] for line in err.splitlines() if " job " in line]
    print(f"SIGTERM with {asks} asks open (grace {SHUTDOWN_GRACE_S} s): job outcomes {outcomes}")
    assert process.returncode is not None
    assert outcomes.count("completed") < asks, err[-3000:]  # the old code ran (and logged) every ask first
    # uvicorn printed a traceback (or "returned without completing response") per cancelled ask; each is told why.
    assert "Traceback" not in err and "without completing" not in err, err[-3000:]
    stopped = [reply for reply in replies if '"code":"stopping"' in reply]
    assert stopped and len(stopped) + outcomes.count("completed") >= len(replies), replies


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_stopping_writes_the_log_and_audit_line_of_every_ask_it_stops(tmp_path):
    """Before the fix a stop exited while the stopped asks were still ending on the engine's worker: no log or audit
    line for any of them (4 admitted asks, 0 lines), the running one included although its tokens had gone out.
    Now the engine waits for them (they end at their next generation step) and every admitted ask has its lines."""
    import json

    audit = tmp_path / "audit.jsonl"
    process, client = _start_engine("--audit", str(audit))
    asks = 4
    try:
        volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
        vid = client.upload_volume(volume).volume_id
        body = {"volume_id": vid, "slices": {"indices": [0, 1, 2]}, "messages": [{"role": "user", "content": QUESTION}],
                "options": {"max_new_tokens": 2048, "repetition_penalty": 1.0}, "stream": True}
        job_ids: list[str] = []
        admitted = threading.Barrier(asks + 1)

        def ask() -> None:
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                    "POST", f"{client.base_url}/v1/ask", json=body, timeout=600) as reply:
                job_ids.append(reply.headers["x-job-id"])
                admitted.wait(timeout=60)
                reply.read()

        threads = [threading.Thread(target=ask, daemon=True) for _ in range(asks)]
        for thread in threads:
            thread.start()
        admitted.wait(timeout=60)  # one runs, the others wait
    finally:
        process.terminate()
        _, err = process.communicate(timeout=120)
    for thread in threads:
        thread.join(timeout=30)
    logged = {line.split(" job ", 1)[1].split(":", 1)[0] for line in err.splitlines() if " job " in line}
    audited = {json.loads(line)["job_id"] for line in audit.read_text().splitlines()}
    assert len(job_ids) == asks and audited == logged == set(job_ids), err[-3000:]
    assert "Traceback" not in err and "Task was destroyed" not in err, err[-3000:]


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_during_an_upload_tells_its_client_instead_of_a_traceback():
    """Before the fix an upload still arriving when Ctrl+C's grace ran out got uvicorn's plain-text 500 and the
    terminal its traceback ("Exception in ASGI application", a CancelledError); now it gets 503 `stopping`."""
    from medsight_testing.arrays import npy

    process, client = _start_engine()
    body = npy(np.zeros((4, 64, 64), np.float32))
    host, port = client.base_url.removeprefix("http://").split(":")
    upload = socket.create_connection((host, int(port)))
    try:
        upload.sendall(f"POST /v1/volumes HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream"
                       f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        time.sleep(0.5)  # the handler holds the first half and waits for the rest
        process.send_signal(signal.SIGINT)
        upload.settimeout(60)
        reply = b""
        while chunk := upload.recv(4096):  # the engine closes the connection after its reply
            reply += chunk
    finally:
        upload.close()
        _, err = process.communicate(timeout=120)
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 503") and '"code": "stopping"' in text, text[:300]
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err[-3000:]


def test_an_unexpected_error_is_logged_without_its_message(engine, monkeypatch):
    """An exception escaping the app is logged by uvicorn ("Exception in ASGI application") with its traceback; its
    message may quote the request (here a failing tokenizer quotes the question). Before the fix the line ended
    `KeyError: 'Where is the secret-looking liver?'`; now it keeps the frames and the type, not the message."""
    from medsight.server import app as app_module
    from medsight.server.app import create_app
    from medsight_testing.arrays import npy
    from medsight_testing.live_server import live_server

    def failing_tokenizer(_engine, messages):
        raise KeyError(messages[-1].content)

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))
    uvicorn_log = logging.getLogger("uvicorn.error")
    with live_server(create_app(engine, model_name="tiny")) as url:
        volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
        upload = httpx.post(f"{url}/v1/volumes", content=npy(volume), headers={"content-type": "application/x-npy"})
        monkeypatch.setattr(app_module, "prompt_tokens", failing_tokenizer)
        uvicorn_log.addHandler(handler)
        try:
            reply = httpx.post(f"{url}/v1/ask", json={"volume_id": upload.json()["volume_id"], "slices": {
                "indices": [1]}, "messages": [{"role": "user", "content": QUESTION}]}, timeout=60)
            deadline = time.monotonic() + 60
            while not lines and time.monotonic() < deadline:  # uvicorn logs it after the 500 went out
                time.sleep(0.01)
        finally:
            uvicorn_log.removeHandler(handler)
    assert reply.status_code == 500 and reply.json()["code"] == "internal_error", reply.text
    logged = "\n".join(lines)
    assert "Exception in ASGI application" in logged and "failing_tokenizer" in logged, logged  # frames kept
    assert logged.rstrip().endswith("KeyError"), logged[-300:]
    assert QUESTION not in logged and "liver" not in logged, logged[-300:]
