"""The first thing every request meets (plain ASGI, so streams and disconnects pass through untouched).

- Host allow-list: a web page can make the browser send requests to 127.0.0.1 under its own host name (DNS
  rebinding); such requests carry that name in `Host` and are refused with 421. Allowed: loopback names, the bound
  host and names given with `allowed_hosts`. When bound to all interfaces, any IP literal is allowed too (a literal
  cannot be rebound).
- Origin: a browser names the page's origin on every cross-origin POST; one whose host is not allowed gets 403.
- Content-Type: POST bodies only of the declared type (415 otherwise).
- Bearer token, when the engine has one, on every path (constant-time comparison).
- Body read deadline: a body must keep arriving at a minimum average rate after a grace period, so slow or half-open
  uploads are cut (408) instead of holding connections and memory.
- A header that these rules read (Host, Origin, Content-Type, Authorization, Content-Length) given twice gets 400.
- A request the server's stop cuts before its response started (e.g. an upload still arriving) gets 503 `stopping`.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from medsight.server.responses import STOPPING_ERROR
from medsight.server.security import is_loopback, token_matches

#: Bodies the engine reads, by path: none of them is a type a web page may send without a CORS preflight
#: ("simple requests": text/plain, form data, or no type at all), which the engine never allows.
BODY_TYPES = {
    "/v1/ask": ("application/json",),
    "/v1/volumes": ("application/octet-stream", "application/x-npy"),
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


class BodyTimeoutError(HTTPException):
    """The request body stopped arriving fast enough. An HTTPException, so that the framework's body parsing (an
    ask's JSON) lets it through instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(408, "the request body arrived too slowly")


def host_name(value: str) -> str:
    """'Host' header or netloc -> lower-case name without port or IPv6 brackets ('' if malformed)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    elif value.count(":") > 1:
        return ""  # an unbracketed IPv6 literal is not a valid Host
    return value.rstrip(".")


def _is_ip_literal(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _configured_name(value: str) -> str:
    """A name given to the engine (--host, --allow-host) as `host_name` reads a Host header; a bare IPv6 address too,
    as people write it ("::1"): read as a Host header it was '' (malformed), so `--host ::1` allowed any IP literal
    and `--allow-host 2001:db8::5` allowed nothing."""
    bare = value.strip().lower()
    return bare if ":" in bare and _is_ip_literal(bare) else host_name(value)


class HostPolicy:
    def __init__(self, bound_host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()) -> None:
        bound = _configured_name(bound_host) if bound_host not in WILDCARD_HOSTS else bound_host
        self.any_ip = bound in WILDCARD_HOSTS
        self.names = set(LOOPBACK_NAMES) | {_configured_name(h) for h in allowed_hosts}
        if not self.any_ip:
            self.names.add(bound)

    def allows(self, name: str) -> bool:
        if not name:
            return False
        if name in self.names or (is_loopback(name) and _is_ip_literal(name)):
            return True
        return self.any_ip and _is_ip_literal(name)


class Guard:
    """ASGI middleware applying the host, origin and token rules and the body read deadline."""

    def __init__(self, app, policy: HostPolicy, token: str | None = None, read_grace_s: float = 10.0,
                 min_read_rate: float = 64 * 1024, body_limits: dict[str, tuple[int, str]] | None = None) -> None:
        """`body_limits`: path -> (largest body in bytes, what bounds it in words), for the paths whose handler does
        not bound its own body (the upload's is checked on its .npy header)."""
        self.app, self.policy, self.token = app, policy, token
        self.body_limits = dict(body_limits or {})
        self.read_grace_s, self.min_read_rate = read_grace_s, min_read_rate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        headers = dict(pairs)
        refusal = _repeated(pairs) or self._refusal(scope, headers)
        if refusal is not None:
            await _send_error(send, *refusal)
            return
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            limit = self.body_limits.get(scope["path"], (None, ""))
            await self.app(scope, self._deadline(receive, *limit), tracked_send)
        except asyncio.CancelledError:
            # The server is stopping and its grace ran out (uvicorn cancels open requests), e.g. mid-upload: the
            # client is told so, instead of uvicorn's traceback in the terminal and a plain-text 500.
            if started:
                raise
            await _send_error(send, 503, STOPPING_ERROR["code"], STOPPING_ERROR["message"])

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = host_name(headers.get("host", ""))
        if not self.policy.allows(host):
            return 421, "unknown_host", "this engine does not answer to that host name (see --allow-host)"
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            parts = urlsplit(origin)
            if not self.policy.allows(host_name(parts.netloc)):
                return 403, "forbidden_origin", "requests from web pages of other sites are refused"
        elif origin == "null":
            return 403, "forbidden_origin", "requests from opaque origins are refused"
        accepted = BODY_TYPES.get(scope["path"])
        if accepted is not None and scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media not in accepted:
                return 415, "unsupported_media_type", f"{scope['path']} takes {' or '.join(accepted)}, " \
                    f"got {media or 'no Content-Type'}"
        # Every path, the API's description (/docs, /openapi.json) included: it names the engine's version, and a
        # rule by path prefix would leave any route added outside /v1 open.
        if self.token and not token_matches(headers.get("authorization"), self.token):
            return 401, "unauthorized", "missing or wrong bearer token"
        (limit, why), declared = self.body_limits.get(scope["path"], (None, "")), headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            return 413, "too_large", f"{scope['path']} takes at most {limit} bytes{why}, got {declared}"
        return None

    def _deadline(self, receive, limit: int | None = None, why: str = ""):
        """`receive` that raises BodyTimeoutError when the body falls behind grace + bytes / min_rate, and a 413
        HTTPException past `limit` bytes (a body sent without its length)."""
        start = time.monotonic()
        received = 0
        body_done = False

        async def timed_receive():
            nonlocal received, body_done
            if body_done:  # later calls only wait for a disconnect: no deadline
                return await receive()
            allowed = self.read_grace_s + received / self.min_read_rate
            remaining = allowed - (time.monotonic() - start)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeoutError() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if limit is not None and received > limit:
                    raise HTTPException(413, f"this request takes at most {limit} bytes{why}")
            return message

        return timed_receive


#: Headers the guard decides on. Given twice, the guard would judge one (a dict keeps the last) and the framework
#: use another (it reads the first): `Origin: <other site>` then `Origin: <this engine>` passed the origin check, a
#: wrong token before the right one passed the token check. Browsers never send them twice.
DECIDING_HEADERS = ("host", "origin", "content-type", "authorization", "content-length")


def _repeated(pairs: list[tuple[str, str]]) -> tuple[int, str, str] | None:
    names = [name for name, _ in pairs]
    twice = [name for name in DECIDING_HEADERS if names.count(name) > 1]
    if twice:
        return 400, "duplicate_header", f"the request gives the {', '.join(twice)} header more than once"
    return None


async def _send_error(send, status: int, code: str, message: str, extra: list | None = None) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
