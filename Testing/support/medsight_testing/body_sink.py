"""A real HTTP server that takes request bodies without keeping them: it hashes each one as it arrives through a
small fixed buffer, so a test measuring a client's memory (tracemalloc is process-wide) sees the client's allocations
only, and still learns exactly which bytes arrived. Standard library only: it serves the Slicer Pythons' tests too."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_BUFFER = 64 * 1024


@dataclass
class Received:
    """One request: its path, headers, and its body's length and SHA-256."""

    path: str
    headers: dict
    length: int
    sha256: str


@dataclass
class BodySink:
    url: str = ""
    reply: dict = field(default_factory=dict)
    pause: float = 0.0
    received: list = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        sink: BodySink = self.server.sink  # type: ignore[attr-defined]
        left = int(self.headers.get("Content-Length") or 0)
        digest, buffer = hashlib.sha256(), bytearray(_BUFFER)
        view = memoryview(buffer)
        while left:
            n = self.rfile.readinto(view[:min(left, _BUFFER)])
            if not n:
                break
            digest.update(view[:n])
            left -= n
            if sink.pause:
                time.sleep(sink.pause)
        length = int(self.headers.get("Content-Length") or 0) - left
        sink.received.append(Received(self.path, dict(self.headers), length, digest.hexdigest()))
        data = json.dumps(sink.reply).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    slow = False

    def server_bind(self) -> None:
        if self.slow:  # a small receive buffer (accepted sockets inherit it): the link's pace reaches the sender
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
        super().server_bind()


@contextlib.contextmanager
def body_sink(reply: dict, pause: float = 0.0) -> Iterator[BodySink]:
    """Serve on a free loopback port until the block ends, answering every POST with 201 and ``reply``; ``pause``
    seconds after each 64 KiB read make a slow link."""
    server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
    server.slow = pause > 0
    server.server_bind()
    server.server_activate()
    sink = BodySink(url=f"http://127.0.0.1:{server.server_address[1]}", reply=reply, pause=pause)
    server.sink = sink  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
