"""How a command shows an error: one line naming the file and the reason, never a traceback."""

from __future__ import annotations


def error_message(err: Exception) -> str:
    """An OSError as 'file: reason' (its str() is '[Errno 13] Permission denied: ...'); anything else as is."""
    if isinstance(err, OSError) and err.strerror:
        files = [f for f in (err.filename, err.filename2) if f is not None]
        return f"{' -> '.join(map(str, files))}: {err.strerror}" if files else err.strerror
    return str(err)
