"""A lock file whose OS lock (flock on POSIX, msvcrt.locking on Windows) marks the one process working in a folder.

The OS releases the lock when its process ends, killed or not, so a killed holder's lock is free to the next process
without anyone deleting it, and two processes can never both hold it (guessing from a pid whether a holder had ended
and replacing its file let two processes that found the same ended holder both take over). The file itself stays in
the folder: only the OS lock on it counts. Standard library only, so a test's child process can load it by path
without the engine."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(Exception):
    """Another process holds the lock; `holder` is its "<pid>@<host>" ("?" where it cannot be read)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextmanager
def hold_lock(path: Path) -> Iterator[None]:
    """Hold the OS lock on `path` (created if missing) until the block ends; `LockHeldError` if another process
    holds it. The file records "<pid>@<host>" of the holder, for the message that refuses another."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        if not _try_lock(fd):
            raise LockHeldError(_holder(fd))
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}".encode())
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0; beyond the end of the file is allowed
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # POSIX: EWOULDBLOCK; Windows: EACCES
        return False
    return True


def _unlock(fd: int) -> None:
    """Closing the file releases the lock on POSIX; Windows asks for an explicit unlock of the same byte."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 256).decode("utf-8", errors="replace").strip()
    except OSError:  # Windows: the holder's locked byte cannot be read
        return "?"
    return text or "?"
