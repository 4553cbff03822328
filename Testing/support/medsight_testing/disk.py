"""A real write failure partway through a file, as on a full disk: the process's file-size limit (POSIX)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """While inside, a write that would take any file past `limit` bytes fails with EFBIG (File too large) after the
    bytes below the limit are written: the torn file a full disk or a killed process leaves."""
    resource = pytest.importorskip("resource")  # POSIX only
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
