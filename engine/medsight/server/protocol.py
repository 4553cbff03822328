"""The engine's HTTP connection protocol: uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn times a connection out only between requests (its keep-alive timeout, reset by any byte): a client that
connects and sends nothing, or sends its headers a byte at a time, held its connection (a file descriptor and a
protocol object) for ever. Bound to a network with a token, anyone who could reach the port could so hold every file
descriptor the engine may open, without the token: the `guard` only sees a request once its headers are complete.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: Seconds a request's headers may take to arrive whole, from the connection's start or the previous response's end.
HEADER_TIMEOUT_S = 10.0
#: What `HeaderDeadlineProtocol` uses of uvicorn's protocol (not a public API: uvicorn is not pinned): the methods it
#: extends, and the attributes an instance has once made.
EXTENDED_METHODS = ("connection_made", "connection_lost", "handle_events", "on_response_complete")
USED_ATTRIBUTES = ("conn", "transport", "loop")


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


def missing_parts(base: type[H11Protocol] = H11Protocol) -> list[str]:
    """The names in `EXTENDED_METHODS` and `USED_ATTRIBUTES` that `base` lacks: a method that is not its own (only
    asyncio.Protocol's no-op), an attribute a new instance does not have or, for `conn`, that is not an h11
    connection. The instance is built, not connected, on a loop of its own."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    async def app(scope, receive, send) -> None:  # never called: the instance only has to be built
        raise RuntimeError("not served")

    missing = [m for m in EXTENDED_METHODS if getattr(base, m, None) in (None, getattr(asyncio.Protocol, m, None))]
    loop = asyncio.new_event_loop()
    try:
        made = base(Config(app, log_config=None), ServerState(), {}, _loop=loop)
    except Exception as err:  # any failure means the class is not what this module was written for
        return [*missing, f"__init__ ({type(err).__name__}: {err})"]
    finally:
        loop.close()
    missing += [a for a in USED_ATTRIBUTES if not hasattr(made, a)]
    if hasattr(made, "conn") and not isinstance(made.conn, h11.Connection):
        missing.append("conn (not an h11.Connection)")
    return missing


def http_protocol(base: type[H11Protocol] = H11Protocol) -> type[H11Protocol]:
    """The HTTP protocol class to serve with: `base` with the header deadline where the installed uvicorn's `base`
    has what `HeaderDeadlineProtocol` uses, else `base` as it is, with one warning: a uvicorn that renamed one of
    them would otherwise fail every connection."""
    missing = missing_parts(base)
    if missing:
        log.warning("header deadline is off: uvicorn %s's %s has no %s, which it needs; serving with uvicorn's own "
                    "protocol (a client may hold a connection open without sending its headers)",
                    _uvicorn_version(), base.__name__, ", ".join(missing))
        return base
    if base is H11Protocol:
        return HeaderDeadlineProtocol
    return type(f"HeaderDeadline{base.__name__}", (HeaderDeadlineProtocol, base), {})


def _uvicorn_version() -> str:
    import uvicorn

    return getattr(uvicorn, "__version__", "?")
