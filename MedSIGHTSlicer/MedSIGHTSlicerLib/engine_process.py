"""A local ``medsight serve`` started and stopped from the module (a QProcess, so Slicer's event loop keeps running
and the engine's output can be shown without a thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .qt_shim import connect, qt
from .settings import split_command

__all__ = ["EngineProcess"]

_TAIL_CHARS = 4000


class EngineProcess:
    """Runs one engine command line; ``stop()`` ends it (and only it).

    Args:
        on_output: called on the main thread with each new piece of the engine's output (stdout and stderr merged).
        on_finished: called with the exit code when the process ends (also after ``stop()``).
    """

    def __init__(
        self,
        on_output: Callable[[str], None] | None = None,
        on_finished: Callable[[int], None] | None = None,
    ) -> None:
        self._process: Any = None
        self._on_output = on_output
        self._on_finished = on_finished
        self.output = ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.state() != qt.QProcess.NotRunning

    def start(self, command: str) -> None:
        """Start ``command`` (e.g. "medsight serve --port 8765"); raises ValueError for an empty command and
        RuntimeError when the program cannot be started (not found, not executable)."""
        if self.running:
            raise RuntimeError("the engine is already running; stop it first")
        program, *arguments = split_command(command)
        process = qt.QProcess()
        # Merged channels: the engine reports its address and errors on stderr, progress on stdout.
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        connect(process, "readyReadStandardOutput", self._read)
        connect(process, "finished", self._finished)
        self.output = ""
        process.start(program, arguments)
        if not process.waitForStarted(10000):
            message = process.errorString()
            raise RuntimeError(f"cannot start {program!r}: {message}")
        self._process = process

    def stop(self, wait_ms: int = 5000) -> None:
        """Ask the engine to exit (SIGTERM on POSIX), then kill it if it is still running after ``wait_ms``."""
        process = self._process
        if process is None:
            return
        if process.state() != qt.QProcess.NotRunning:
            process.terminate()
            if not process.waitForFinished(wait_ms):
                process.kill()
                process.waitForFinished(wait_ms)
        self._process = None

    def _read(self, *_: Any) -> None:
        if self._process is None:
            return
        text = _text(self._process.readAllStandardOutput())
        # Keep only the tail: the engine can run for days, and only its last lines matter for an error.
        self.output = (self.output + text)[-_TAIL_CHARS:]
        if self._on_output is not None and text:
            self._on_output(text)

    def _finished(self, *args: Any) -> None:
        code = int(args[0]) if args else -1
        if self._on_finished is not None:
            self._on_finished(code)


def _text(data: Any) -> str:
    """A QByteArray (PySide: ``bytes(qba)``; PythonQt: ``qba.data()``) or str -> text."""
    if isinstance(data, str):
        return data
    raw = data.data() if hasattr(data, "data") else data
    if isinstance(raw, str):  # some PythonQt builds hand back str from data()
        return raw
    return bytes(raw).decode("utf-8", errors="replace")
