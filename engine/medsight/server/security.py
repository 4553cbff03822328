"""Who may talk to the engine: loopback by default; any other bind address requires a bearer token."""

from __future__ import annotations

import hmac
import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (patient images would be exposed), or with a token no
    client can send."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to listen on {host} without a token: set MEDSIGHT_TOKEN or pass --token-file, "
            "or bind 127.0.0.1"
        )
    # A header carries bytes: a UTF-8 client (curl) sent "ä" as two bytes where a Latin-1 one (the module's
    # http.client) sent one, and "€" cannot be sent at all, so such a token got 401 from some clients or all.
    unsendable = [i for i, c in enumerate(token or "") if not " " <= c <= "~"]
    if unsendable:
        raise ValueError(f"the token must be printable ASCII (letters, digits, punctuation, spaces), so that every "
                         f"HTTP client sends it alike: character {unsendable[0] + 1} is not")
    # HTTP drops the spaces that end a header, and the spaces after "Bearer" are all the separator (RFC 9110): a
    # token starting or ending with a space could never be sent.
    if token and token != token.strip(" "):
        raise ValueError("the token must not start or end with a space: no HTTP client can send those spaces")


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header as RFC 9110 (11.4) writes credentials:
    `auth-scheme 1*SP token68`, the scheme's name in any case and one or more spaces (not tabs) before the token."""
    scheme, space, given = (header or "").partition(" ")
    if not space or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.lstrip(" ").encode(), token.encode())
