"""Files written whole or not at all: a unique temporary file beside the target, flushed to disk, then renamed over
it (`replace_file`) or linked into place by the caller. A process killed while writing, or a machine that loses
power afterwards, leaves either the old file or the new one, never a torn one; files that mark something complete
(a checkpoint's trainer state, a report's settings) rely on this, and a user's outputs (segmentations, overlays)
are never left torn where a complete one was expected. A write ended by Ctrl+C or SIGTERM removes its temporary."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class _Terminated(BaseException):
    """SIGTERM arrived while a temporary file existed (raised by `temporaries_removed_on_sigterm`'s handler)."""


@contextlib.contextmanager
def temporaries_removed_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM unwinds the stack (as Ctrl+C does) so the `except`/`finally` that remove a temporary
    file run, then ends the process by SIGTERM as before: its default action killed the process at once and left a
    hidden `.NAME.*.tmp` beside the target (`kill`, a batch scheduler's time limit, Slicer stopping the engine).
    Only where SIGTERM still has its default action and on the main thread (the only one signals reach); a server
    or trainer with its own handler keeps it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    received: list[int] = []

    def handler(signum, frame):
        # Raised once: a second SIGTERM (torchrun forwards one to ranks a batch scheduler signalled too) raised in
        # the cleanup the first one started cut it short and left the temporary.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise _Terminated

    try:
        signal.signal(signal.SIGTERM, handler)  # inside the try: a SIGTERM that comes at once is handled too
        yield
    except _Terminated:
        pass
    finally:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except _Terminated:  # pending as the block ended: signal.signal runs the handler before replacing it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:  # also when a library turned the raise into its own error
            signal.raise_signal(signal.SIGTERM)  # end as the signal would have: the parent sees "killed by SIGTERM"


def write_temporary(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """A complete temporary file in `path`'s folder, written by `write(temporary)` and flushed to disk. Its name is
    unique (random, not the pid: processes on two hosts sharing the folder can have the same one) and ends in
    `suffix`, for writers that pick the format by the name (".nii.gz"); removed if writing fails. It is created
    with the permissions a plain open() gives (not mkstemp's 0600): a user's outputs are shared like any file."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp{suffix}"
    with temporaries_removed_on_sigterm():
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as err:  # a read-only or missing folder: the error named our hidden temporary, not the file
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        try:
            write(temporary)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        except BaseException as err:
            temporary.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.filename is None and err.strerror:
                # A write's own error names no file (a full disk: "No space left on device"): name the one written.
                raise OSError(err.errno, err.strerror, os.fspath(path)) from err
            raise
    return temporary


def replace_file(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write `path` through `write_temporary`, then rename it into place and flush the folder's entry."""
    replace_files([(path, write, suffix)])


def replace_files(files: list[tuple[Path, Callable[[Path], None], str]]) -> None:
    """Replace files that belong together (an image and its labels sidecar), each given as (path, write, suffix):
    every temporary is written before any is renamed, so a failed or interrupted write leaves the old files.
    A path that is a symbolic link is written through, as open(), cp and the shell's > do: its target is replaced
    and the link stays (renaming onto the link itself replaced the link and left the target's old content)."""
    files = [(written_file(path), write, suffix) for path, write, suffix in files]
    temporaries: list[Path] = []
    with temporaries_removed_on_sigterm():
        try:
            for path, write, suffix in files:
                temporaries.append(write_temporary(path, write, suffix))
            for (path, _, _), temporary in zip(files, temporaries, strict=True):
                os.replace(temporary, path)
        except BaseException:
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
            raise
    for folder in dict.fromkeys(path.parent for path, _, _ in files):
        sync_folder(folder)


def written_file(path: str | os.PathLike[str]) -> Path:
    """The file a write to `path` replaces: a symbolic link's target (links written through), else `path` itself."""
    return Path(os.path.realpath(path) if os.path.islink(path) else path)


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


def sync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders' entries, to disk: files written in place (a checkpoint's
    weights) before the file that marks them complete is written, so a power loss cannot leave the mark with
    missing or torn files behind it."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as written:
                os.fsync(written.fileno())
        sync_folder(Path(root))
