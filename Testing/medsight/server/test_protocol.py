"""A request's headers must arrive whole within the protocol's deadline, on a live uvicorn server."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from medsight.server.app import create_app
from medsight.server.protocol import HeaderDeadlineProtocol
from medsight_testing.live_server import live_server


class QuickDeadline(HeaderDeadlineProtocol):
    header_timeout_s = 0.5


def _closed_by_server(connection: socket.socket, trickle: bytes = b"") -> bool:
    """Send `trickle` a byte at a time (never finishing the headers) until the server closes the connection; True
    if it did. The bound is a hang guard, far above the deadline, not a speed requirement."""
    connection.settimeout(0.2)
    give_up = time.monotonic() + 60
    sent = 0
    while time.monotonic() < give_up:
        try:
            if connection.recv(1024) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionResetError:
            return True
        if trickle:
            try:
                connection.sendall(trickle[sent % len(trickle):][:1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            sent += 1
    return False


@pytest.fixture(scope="module")
def quick(engine):
    with live_server(create_app(engine, model_name="tiny"), protocol=QuickDeadline) as url:
        yield url


def test_a_connection_that_sends_nothing_is_closed(quick):
    """Before the fix it stayed open for good (42 s and counting: uvicorn times out only between requests)."""
    host, port = quick.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as idle:
        assert _closed_by_server(idle)


def test_headers_sent_a_byte_at_a_time_are_cut(quick):
    """Every byte reset uvicorn's keep-alive timer: headers that never end held the connection for ever."""
    host, port = quick.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as slow:
        assert _closed_by_server(slow, b"X-Padding: " + b"a" * 10_000)


def test_the_next_request_on_a_kept_connection_has_its_deadline_too(quick):
    host, port = quick.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as kept:
        kept.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(kept, b"GET /v1/health HTTP/1.1\r\nX-Padding: " + b"a" * 10_000)


def test_requests_whose_headers_arrive_in_time_are_answered(quick):
    with httpx.Client(base_url=quick) as c:
        for _ in range(3):  # one connection, kept between requests
            assert c.get("/v1/health").status_code == 200


def test_the_next_request_after_an_unread_body_has_its_deadline_too(quick):
    """A response sent before its request's body was read (a health check given a body) ended while the client was
    still sending: the next request's deadline was armed only at a response's end, so headers trickled after that
    body held the connection for ever."""
    host, port = quick.removeprefix("http://").split(":")
    body = b"x" * 100
    with socket.create_connection((host, int(port))) as kept:
        kept.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")  # answered before the body arrived
        kept.sendall(body)
        assert _closed_by_server(kept, b"GET /v1/health HTTP/1.1\r\nX-Padding: " + b"a" * 10_000)
