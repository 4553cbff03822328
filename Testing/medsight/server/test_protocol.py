"""A request's headers must arrive whole within the protocol's deadline, on a live uvicorn server."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

from medsight.server.app import create_app
from medsight.server.protocol import HeaderDeadlineProtocol, http_protocol
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


class RenamedEvents(H11Protocol):
    """uvicorn's protocol as a release that renamed `handle_events` (to `_handle_events`) would have it: the class has
    no `handle_events`, and uvicorn's own calls reach the renamed method."""

    _handle_events = H11Protocol.handle_events
    handle_events = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self).handle_events is None:  # uvicorn's call in on_response_complete
            self.handle_events = self._handle_events

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self.conn.receive_data(data)
        self._handle_events()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_installed_uvicorn_is_served_with_the_header_deadline(caplog):
    with caplog.at_level(logging.WARNING):
        assert http_protocol() is HeaderDeadlineProtocol
    assert _warnings(caplog) == []


def test_a_uvicorn_without_what_the_deadline_needs_is_served_by_its_own_protocol_with_one_warning(engine, caplog):
    """The deadline subclass relies on parts of uvicorn's protocol that are not its public API (uvicorn is not
    pinned). On a uvicorn without `handle_events`, it raised on every response (5 of 5 requests: "Exception in ASGI
    application", TypeError). The protocol served is now checked first: uvicorn's own, with one warning that the
    header deadline is off, and every request answered without a server error."""
    with caplog.at_level(logging.WARNING):
        chosen = http_protocol(RenamedEvents)
        assert chosen is RenamedEvents
        warned = _warnings(caplog)
        assert len(warned) == 1 and "header deadline is off" in warned[0] and "handle_events" in warned[0], warned
        requests = 5
        with live_server(create_app(engine, model_name="tiny"), protocol=chosen) as url, httpx.Client() as client:
            statuses = [client.get(f"{url}/v1/health").status_code for _ in range(requests)]
    assert statuses == [200] * requests
    assert _warnings(caplog) == warned  # no server error, no second warning


class RenamedLoop(H11Protocol):
    """uvicorn's protocol as a release that renamed the instance's `loop` (to `event_loop`) would have it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.event_loop = self.__dict__.pop("loop")


def test_an_instance_attribute_the_deadline_uses_is_checked_too(caplog):
    """`conn`, `transport` and `loop` are set on each instance, not on the class: the check builds one."""
    from medsight.server.protocol import missing_parts

    assert missing_parts() == []
    assert missing_parts(RenamedLoop) == ["loop"]
    with caplog.at_level(logging.WARNING):
        assert http_protocol(RenamedLoop) is RenamedLoop
    assert len(_warnings(caplog)) == 1 and "has no loop" in _warnings(caplog)[0]
