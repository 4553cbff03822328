"""Connection settings of the MedSIGHT module, kept in a QSettings-like store (Qt-free: any object with
``value(key, default)`` and ``setValue(key, value)`` will do, e.g. ``qt.QSettings()`` or a dict wrapper)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .client import DEFAULT_URL
from .engine_launch import DEFAULT_SERVE_COMMAND, served_port, split_command

__all__ = ["DEFAULT_SERVE_COMMAND", "ConnectionSettings", "host_of", "is_loopback_url", "split_command"]

PREFIX = "MedSIGHT/"
#: Earlier defaults, saved by older versions without the user choosing them: read back as today's default.
_OLD_DEFAULT_COMMANDS = ("medsight serve --model tiny --host 127.0.0.1 --port 8765",)


def host_of(url: str) -> str:
    """The host name of an engine URL, lower-case ('' when the URL has none)."""
    return (urllib.parse.urlsplit(url.strip()).hostname or "").lower()


def is_loopback_url(url: str) -> bool:
    """True when the engine runs on this computer, so images never leave it (no consent needed)."""
    host = host_of(url)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _as_bool(value: Any, default: bool) -> bool:
    """A stored yes/no. QSettings gives back strings ("true"/"false") for values written by another binding or an
    INI file, and None for an invalid one: anything unreadable ("", "abc", an edited file) is ``default``, not False
    (a "stop on exit" read as False left the engine holding its port and memory after Slicer closed)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    word = str(value).strip().lower() if isinstance(value, str) else ""
    if word in _TRUE_WORDS:
        return True
    return False if word in _FALSE_WORDS else default


def _as_text(value: Any, default: str) -> str:
    """A stored string; ``default`` for none or an empty one. Qt's INI reader (Slicer keeps its settings in an INI
    file) splits an unquoted value at its commas into a list: a hand-edited "--allow-host a.example,b.example" in the
    engine command came back as "['medsight serve ... a.example', 'b.example']", was run so and saved so. The parts
    are joined again (Qt drops spaces around those commas; quoting the value in the file keeps them)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(part) for part in value)
    return str(value) if value else default


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in parts if str(v).strip()]  # "a, b" typed into the file: host " b" never matched


@dataclass
class ConnectionSettings:
    """What the module remembers between sessions.

    Attributes:
        url: the engine's address.
        token: bearer token (only needed when the engine was started with one); kept on disk only when
            ``remember_token`` is set (the user ticked "Remember"), else for this session only.
        remember_token: store the token in Slicer's settings file.
        serve_command: the command "Start local engine" runs.
        stop_engine_on_exit: stop an engine this module started when Slicer closes.
        consented_hosts: non-loopback hosts the user agreed to send images to.
    """

    url: str = DEFAULT_URL
    token: str = ""
    remember_token: bool = False
    serve_command: str = DEFAULT_SERVE_COMMAND
    stop_engine_on_exit: bool = True
    consented_hosts: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, store: Any) -> ConnectionSettings:
        default = cls()
        remember = _as_bool(store.value(PREFIX + "rememberToken", False), default.remember_token)
        command = _as_text(store.value(PREFIX + "serveCommand", default.serve_command), default.serve_command)
        return cls(
            url=_as_text(store.value(PREFIX + "url", default.url), default.url),
            token=_as_text(store.value(PREFIX + "token", ""), "") if remember else "",
            remember_token=remember,
            serve_command=default.serve_command if command in _OLD_DEFAULT_COMMANDS else command,
            stop_engine_on_exit=_as_bool(store.value(PREFIX + "stopEngineOnExit", True), default.stop_engine_on_exit),
            consented_hosts=_as_list(store.value(PREFIX + "consentedHosts", "")),
        )

    def save(self, store: Any) -> None:
        store.setValue(PREFIX + "url", self.url)
        # A token not to be remembered is blanked on disk (also one an earlier version wrote unasked).
        store.setValue(PREFIX + "token", self.token if self.remember_token else "")
        store.setValue(PREFIX + "rememberToken", "true" if self.remember_token else "false")
        store.setValue(PREFIX + "serveCommand", self.serve_command)
        store.setValue(PREFIX + "stopEngineOnExit", "true" if self.stop_engine_on_exit else "false")
        # A comma-joined string: QSettings round-trips lists differently in PythonQt and PySide.
        store.setValue(PREFIX + "consentedHosts", ",".join(self.consented_hosts))

    def set_connection(self, url: str, token: str) -> bool:
        """Take the URL and token from the form; True only when either really changed (so the client, and the
        engine's volume ids with it, are kept when the user merely leaves a field)."""
        url, token = url.strip(), token.strip()
        changed = (url, token) != (self.url.strip(), self.token.strip())
        self.url, self.token = url, token
        return changed

    def needs_consent(self, url: str | None = None) -> bool:
        """Uploading to ``url`` (default: ``self.url``) sends images off this computer and was not agreed to."""
        url = self.url if url is None else url
        return not is_loopback_url(url) and host_of(url) not in self.consented_hosts

    def port_mismatch(self, windows: bool | None = None) -> str | None:
        """Why questions would not reach the engine "Start local engine" runs: its command serves one port of this
        computer and the engine URL names another (the engine started, its log said where it listened, and every
        question said "cannot reach the MedSIGHT engine ... Is the engine running?"). None when they agree, the URL
        is another computer's, or either cannot be read (each is named where it is used)."""
        try:
            parts = urllib.parse.urlsplit(self.url.strip())
            url_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
            served = served_port(split_command(self.serve_command, windows))
        except ValueError:
            return None
        if not is_loopback_url(self.url) or served is None or served == url_port:
            return None
        return (f"The local engine command serves port {served}, but the engine URL {self.url.strip()} names port "
                f"{url_port}: questions would not reach it. Set the engine URL to port {served}, or the command's "
                f"--port to {url_port}.")

    def start_question(self, windows: bool | None = None) -> str | None:
        """What "Start local engine" asks before it starts the engine (OK starts it, Cancel does not), or None to
        start at once: the `port_mismatch`. Asked after the start, the warning came once the engine ran and its
        modal dialog held back the engine's log."""
        mismatch = self.port_mismatch(windows)
        return f"{mismatch}\n\nStart the engine anyway?" if mismatch else None

    def record_consent(self, url: str | None = None) -> None:
        host = host_of(self.url if url is None else url)
        if host and host not in self.consented_hosts:
            self.consented_hosts.append(host)
