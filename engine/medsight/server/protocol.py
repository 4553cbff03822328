"""The engine's HTTP connection protocol: uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn times a connection out only between requests (its keep-alive timeout, reset by any byte): a client that
connects and sends nothing, or sends its headers a byte at a time, held its connection (a file descriptor and a
protocol object) for ever. Bound to a network with a token, anyone who could reach the port could so hold every file
descriptor the engine may open, without the token: the `guard` only sees a request once its headers are complete.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a request's headers may take to arrive whole, from the connection's start or the previous response's end.
HEADER_TIMEOUT_S = 10.0


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers are not complete `header_timeout_s` after the
    connection opened or its previous response ended."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due: asyncio.TimerHandle | None = None
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers arrived (or the connection ended)
            self._disarm()
        elif self.conn.our_state is h11.IDLE and self._headers_due is None and not self.transport.is_closing():
            # A new cycle began here, not at a response's end: the response went out before its request's body
            # was read, and the body's end started the next cycle. Its headers are due in turn.
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's headers are due in turn

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm(self) -> None:
        if getattr(self, "_headers_due", None) is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_overdue(self) -> None:
        self._headers_due = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
