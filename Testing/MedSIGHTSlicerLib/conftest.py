"""Fixtures for the Slicer-side client tests: the client package on sys.path and a scriptable fake engine."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))

try:
    import slicer  # noqa: F401  (slicer-core; absent under the Slicer Pythons' MRML-free runs)
except ImportError:
    pass
else:
    from medsight_testing.review_scene import register_segmentation_converters

    register_segmentation_converters()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes


@dataclass
class FakeEngine:
    """A stdlib HTTP server whose replies the test scripts: routes[(method, path)] = handler(request_handler).

    A route may also be a list of handlers, used one per request (the last one repeats).
    """

    url: str = ""
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def add(self, method: str, path: str, *handlers) -> None:
        self.routes[(method, path)] = list(handlers)

    def hits(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if (r.method, r.path) == (method, path))

    # Reply builders, reached through the fixture (a conftest is not importable under --import-mode=importlib).
    @staticmethod
    def reply(status: int = 200, body=None, content_type: str = "application/json", delay: float = 0.0):
        return reply(status, body, content_type, delay)

    def sse(self, chunks, pause: float = 0.0, hold: float = 0.0):
        return sse_reply(chunks, pause, hold, self)


def reply(status: int = 200, body=None, content_type: str = "application/json", delay: float = 0.0):
    """A handler sending one complete response (dicts and lists are sent as JSON)."""

    def handler(h: BaseHTTPRequestHandler) -> None:
        if delay:
            time.sleep(delay)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        if isinstance(data, str):
            data = data.encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return handler


def sse_reply(chunks, pause: float = 0.0, hold: float = 0.0, fake: FakeEngine | None = None):
    """A handler streaming `chunks` (bytes) as a chunked text/event-stream; then, for `hold` seconds, keep-alive
    comments (recording in `fake.disconnected` when the client hangs up)."""

    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        try:
            for chunk in chunks:
                send(chunk)
                if pause:
                    time.sleep(pause)
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                time.sleep(0.02)
                send(b": keep-alive\n\n")
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            if fake is not None:
                fake.disconnected.set()
        h.close_connection = True

    return handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        fake: FakeEngine = self.server.fake  # type: ignore[attr-defined]
        parts = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fake.requests.append(
            Recorded(self.command, parts.path, dict(urllib.parse.parse_qsl(parts.query)), dict(self.headers), body)
        )
        handlers = fake.routes.get((self.command, parts.path))
        if not handlers:
            reply(404, {"code": "not_found", "message": f"no route {parts.path}"})(self)
            return
        handler = handlers.pop(0) if len(handlers) > 1 else handlers[0]
        handler(self)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    engine = FakeEngine(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.fake = engine  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def engine():
    """The tiny random-weight engine that the end-to-end tests talk to through a real server."""
    import medsight

    return medsight.Engine.load("tiny", device="cpu")


@pytest.fixture(scope="module")
def url(engine):
    """Base URL of a real uvicorn server on a free loopback port, serving ``engine``."""
    import medsight.server.app
    from medsight_testing.live_server import live_server

    with live_server(medsight.server.app.create_app(engine)) as base_url:
        yield base_url
