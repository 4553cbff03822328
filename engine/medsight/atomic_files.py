"""Files written whole or not at all: a unique temporary file beside the target, flushed to disk, then renamed over
it (`replace_file`) or linked into place by the caller. A process killed while writing, or a machine that loses
power afterwards, leaves either the old file or the new one, never a torn one; files that mark something complete
(a checkpoint's trainer state, a report's settings) rely on this."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_temporary(path: Path, write: Callable[[Path], None]) -> Path:
    """A complete temporary file in `path`'s folder, written by `write(temporary)` and flushed to disk. Its name is
    unique (not the pid: processes on two hosts sharing the folder can have the same one); removed if writing fails."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write_temporary`, then rename it into place and flush the folder's entry."""
    temporary = write_temporary(path, write)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename or link in it) to disk; skipped where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(handle)
