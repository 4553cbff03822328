"""How "Start local engine" runs ``medsight serve``: the command line split as the user's OS would, and the
environment a foreign Python needs.

3D Slicer's launcher sets PYTHONHOME, PYTHONPATH and PYTHONNOUSERSITE for its bundled Python (3.9 in Slicer 5.8).
A child that inherits them starts the engine's own interpreter (3.10 or newer) with Slicer's standard library, and
it dies at start-up. So the engine gets the environment Slicer itself was started from
(``slicer.util.startupEnvironment()``), minus those variables in case the user had set them too.

Standard library only (no Qt, no Slicer): every rule here is tested on every OS.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_SERVE_COMMAND",
    "EXIT_WITH_PARENT_VARIABLE",
    "KEEP_RUNNING_LINE",
    "OUTPUT_ENCODING_VARIABLE",
    "PYTHON_VARIABLES",
    "LaunchPlan",
    "engine_environment",
    "launch_plan",
    "served_port",
    "split_command",
    "split_windows_command",
    "startup_environment",
]

#: What "Start local engine" runs when nothing else is configured: the engine on PATH serving the embedded demo
#: model (``medsight serve`` defaults to it; named here so the setting says what it serves).
DEFAULT_SERVE_COMMAND = "medsight serve --model demo --host 127.0.0.1 --port 8765"
#: Variables that tie a Python interpreter to one installation: never handed to the engine's interpreter.
PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE")
#: The encoding of the engine's stdout and stderr (set to UTF-8, see ``engine_environment``).
OUTPUT_ENCODING_VARIABLE = "PYTHONIOENCODING"
#: Set to 1 for an engine that is to stop when Slicer ends, crash included (``medsight serve --exit-with-parent``,
#: the engine's ``medsight.server.parent_watch``): it stops when its standard input, a pipe the module holds, closes.
#: An environment variable, not an argument added to the user's command: it also reaches an engine behind a wrapper
#: (``sh -c '...'``, ``conda run``), and an older engine ignores it where it would refuse an unknown argument.
EXIT_WITH_PARENT_VARIABLE = "MEDSIGHT_EXIT_WITH_PARENT"
#: What the module writes to that pipe to leave the engine running after all (``EngineProcess.release``).
KEEP_RUNNING_LINE = b"keep-running\n"


def split_windows_command(command: str) -> list[str]:
    """Split a command line by the Microsoft C runtime's rules (what ``CommandLineToArgvW`` does).

    Backslashes are literal (``C:\\Users\\me\\medsight.exe`` survives) except before a double quote: 2n of them and
    a quote give n backslashes and open or close a quoted part; 2n+1 give n backslashes and a literal quote. Inside
    quotes, ``""`` is a literal quote; an unclosed quote runs to the end.
    """
    args: list[str] = []
    current: list[str] = []
    in_arg = in_quotes = False
    i, n = 0, len(command)
    while i < n:
        ch = command[i]
        if ch == "\\":
            start = i
            while i < n and command[i] == "\\":
                i += 1
            count = i - start
            if i < n and command[i] == '"':
                current.append("\\" * (count // 2))
                if count % 2:
                    current.append('"')
                    i += 1
                in_arg = True
                continue
            current.append("\\" * count)
            in_arg = True
            continue
        if ch == '"':
            if in_quotes and i + 1 < n and command[i + 1] == '"':
                current.append('"')
                i += 2
                continue
            in_quotes = not in_quotes
            in_arg = True
            i += 1
            continue
        if ch in " \t" and not in_quotes:
            if in_arg:
                args.append("".join(current))
                current, in_arg = [], False
            i += 1
            continue
        current.append(ch)
        in_arg = True
        i += 1
    if in_arg:  # an unclosed quote runs to the end of the line, as in the C runtime
        args.append("".join(current))
    return args


def split_command(command: str, windows: bool | None = None) -> list[str]:
    """A command line -> program and arguments, by the rules of the OS (``windows`` overrides it, for tests).

    Raises ValueError for an empty command or unbalanced quotes.
    """
    windows = os.name == "nt" if windows is None else windows
    try:
        parts = split_windows_command(command) if windows else shlex.split(command)
    except ValueError as err:
        raise ValueError(f"cannot read the engine command: {err}") from None
    if not parts:
        raise ValueError("the engine command is empty")
    return parts


def startup_environment(slicer_util: Any = None) -> dict[str, str]:
    """The environment Slicer was started from (without its launcher's settings); outside Slicer, this process's.

    ``slicer_util`` is ``slicer.util`` (passed in so this module never imports Slicer).
    """
    getter: Callable[[], Mapping[str, str]] | None = getattr(slicer_util, "startupEnvironment", None)
    if getter is not None:
        environment = getter()
        if environment:
            return {str(k): str(v) for k, v in environment.items() if k}
    return dict(os.environ)


def engine_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without the Python-binding variables, with unbuffered output so the panel sees it at once, and
    with UTF-8 output: the engine's log is read as UTF-8 (``engine_process.OutputLines``), but a Python on Windows
    writes a file in the ANSI code page (cp1252 on a Western system), so a path with "é" arrived as "\ufffd" and
    one with a character outside that page ended the engine with a UnicodeEncodeError while it printed it."""
    environment = {k: v for k, v in base.items() if k.upper() not in (*PYTHON_VARIABLES, OUTPUT_ENCODING_VARIABLE)}
    environment["PYTHONUNBUFFERED"] = "1"
    environment[OUTPUT_ENCODING_VARIABLE] = "utf-8"
    return environment


@dataclass(frozen=True)
class LaunchPlan:
    """What to run and how.

    Attributes:
        program, arguments: the split command.
        environment: the full environment of the child.
        detached: the engine outlives Slicer (its own process group on Windows, no pipe to watch): used when the
            user does not want it stopped at exit. Otherwise the engine exits with Slicer, also when Slicer crashes
            or is killed (``EXIT_WITH_PARENT_VARIABLE`` in ``environment``, a pipe on its standard input).
    """

    program: str
    arguments: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    detached: bool = False

    @property
    def argv(self) -> list[str]:
        return [self.program, *self.arguments]


def launch_plan(command: str, base_environment: Mapping[str, str], stop_on_exit: bool,
                windows: bool | None = None) -> LaunchPlan:
    """Everything "Start local engine" decides, from the settings and the startup environment."""
    program, *arguments = split_command(command, windows)
    environment = engine_environment(base_environment)
    if stop_on_exit:
        environment[EXIT_WITH_PARENT_VARIABLE] = "1"
    else:  # one the user's own environment carries would stop an engine meant to outlive Slicer
        environment = {k: v for k, v in environment.items() if k.upper() != EXIT_WITH_PARENT_VARIABLE}
    return LaunchPlan(program, arguments, environment, detached=not stop_on_exit)


#: The shortest abbreviation of ``serve --port`` argparse takes: "--p" is also ``--perceiver-attention``'s.
_PORT_PREFIX = "--po"


def _is_port_option(option: str) -> bool:
    """``option`` (before any "=") names ``--port`` as the engine's argparse reads it: whole or abbreviated."""
    return option.startswith(_PORT_PREFIX) and "--port".startswith(option)


def served_port(arguments: Sequence[str]) -> int | None:
    """The port a ``serve`` command line listens on: its last ``--port N`` / ``--port=N`` (argparse keeps the last,
    and takes the abbreviations ``--po``, ``--por``), else the engine's default, the default command's; None when it
    is no ``serve`` command, names no number or is one the engine refuses (the ambiguous ``--p``)."""
    if "serve" not in arguments:
        return None
    port: str | None = None
    for i, argument in enumerate(arguments):
        option, equals, value = argument.partition("=")
        if option == "--p":  # argparse refuses it as ambiguous: the engine will not start
            return None
        if not _is_port_option(option):
            continue
        if equals:
            port = value
        elif i + 1 < len(arguments):
            port = arguments[i + 1]
    if port is None:
        return served_port(split_command(DEFAULT_SERVE_COMMAND, windows=False))
    return int(port) if port.isdigit() else None

