"""How a command shows an error: one line naming the file and the reason, never a traceback; and a reader of its
output that left early, which is no error."""

from __future__ import annotations

import os
import select
import sys

#: The exit code when the reader of stdout left early (`medsight ask ... | head -1`): 128 + SIGPIPE, the status
#: git, seq and cat get in the same pipe (killed by the signal), so `set -o pipefail` scripts see what they are used
#: to. (Not SIGPIPE's default action instead: it would also kill `serve` when a client closes its socket.)
READER_LEFT = 141


def error_message(err: Exception) -> str:
    """An OSError as 'file: reason' (its str() is '[Errno 13] Permission denied: ...'); anything else as is."""
    if isinstance(err, OSError) and err.strerror:
        files = [f for f in (err.filename, err.filename2) if f is not None]
        return f"{' -> '.join(map(str, files))}: {err.strerror}" if files else err.strerror
    return str(err)


def reader_left() -> bool:
    """After a BrokenPipeError: whether it was stdout's reader that left (`medsight ... | head -1`), which is no error.
    Then stdout is pointed at devnull (`_silence_stdout`), so nothing more raises; False for another pipe's."""
    if not _stdout_reader_gone():
        return False
    _silence_stdout()
    return True


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end): a BrokenPipeError
    that is not stdout's (a worker's pipe, a socket) is a real error. Where poll is missing (Windows) a
    BrokenPipeError is taken to be stdout's, as Python's docs recipe does."""
    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process): not a pipe we write to
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at devnull once its reader is gone, so later prints and the flush at interpreter exit do not
    raise or print "Exception ignored ... BrokenPipeError" (the recipe of Python's signal docs, "Note on SIGPIPE")."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
