"""Waiting on real processes and ports, standard library only (the Slicer-side tests also run under Slicer's
Pythons, without the engine's packages)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: a child of this process is reaped, and a zombie (an orphan that a
    container's PID 1 never reaps) counts as ended."""
    if os.name == "nt":
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}"], capture_output=True, text=True).stdout
        return str(pid) in out
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # state Z in /proc
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def free_port() -> int:
    """A loopback TCP port free now (something may take it before it is bound again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed_engine() -> Path:
    """The ``medsight`` program beside this Python; the test is skipped where there is none. The Slicer-side tests also
    run under Slicer's Pythons, where the engine's package is importable from the checkout but none of what it needs
    (torch, scipy ...) is installed: a real engine can run only in an environment that installed it."""
    import sys

    import pytest

    program = Path(sys.executable).with_name("medsight.exe" if os.name == "nt" else "medsight")
    if not program.is_file():
        pytest.skip("no medsight executable beside this Python")
    return program
