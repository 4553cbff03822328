"""A local ``medsight serve`` started and stopped from the module.

A plain ``subprocess`` child, not a QProcess: a QProcess owned by Python kills its child when it is destroyed, so an
engine the user wants kept alive after Slicer exits could not survive. The engine writes to a log file; the module
polls ``poll()`` from a QTimer (main thread) for new output and the exit code, so no thread touches the GUI.

An engine that is to stop with Slicer gets a pipe as its standard input, which the module holds and writes nothing
to (``medsight serve --exit-with-parent``): however Slicer ends, a crash and a kill included, the OS closes its end and
the engine stops itself. It leads a session of its own (so that Stop reaches its whole group), so no signal of
Slicer's end reaches it: without the pipe, after a crash it kept its port and a GPU's memory until the user found and
killed it.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .engine_launch import KEEP_RUNNING_LINE, LaunchPlan

__all__ = ["EngineProcess", "OutputLines", "exit_message", "leave_engine", "output_lines", "replaced_by_reload"]

_TAIL_CHARS = 4000
#: How much of the engine's last output lines an exit message quotes.
EXIT_TAIL_CHARS = 300


def output_lines(text: str) -> list[str]:
    """The non-blank lines of a piece of engine output (whitespace-only output has none)."""
    return [line.rstrip() for line in text.splitlines() if line.strip()]


#: Terminal control sequences (colours, cursor moves): uvicorn colours its levels, tqdm moves the cursor.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
#: The start of one, cut off by the end of a read: shown as nothing until the rest arrives.
_ANSI_START = re.compile(r"\x1b(\[[0-?]*[ -/]*)?$")


#: The longest line the log keeps: its start (an exception's name) and its latest end, the middle cut out.
LINE_CHARS = 4000
_CUT = " [...] "


def _shorten(line: str) -> str:
    """``line`` cut to about ``LINE_CHARS`` characters, keeping its start and its end."""
    if len(line) <= LINE_CHARS:
        return line
    half = (LINE_CHARS - len(_CUT)) // 2
    return line[:half] + _CUT + line[-half:]


def _latest_state(line: str) -> str:
    """What a terminal shows for ``line``: the text after its last carriage return (a progress bar redraws itself
    after "\\r"; a Windows "\\r\\n" ending is not a redraw)."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


class OutputLines:
    """The engine's raw output -> the lines a terminal would show.

    Progress bars (tqdm, huggingface_hub downloads) redraw one line with "\\r" and no newline: each redraw used to
    become a line of its own (a 16 GB download flooded the 2000-line log, pushing out the lines that explain an
    error). Here a line counts when its newline arrives, as its latest state; the unfinished line is ``partial``.
    Bytes are decoded incrementally (a UTF-8 character split between two reads is not garbled) and ANSI codes
    dropped.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    @property
    def partial(self) -> str:
        """The latest state of the line being written ("" when none)."""
        return _latest_state(_ANSI_START.sub("", self._pending))

    def feed(self, data: bytes) -> list[str]:
        """The lines ``data`` finished (blank ones included), each as its latest state."""
        # The escape codes are removed after joining: one split between two reads is still recognised.
        text = _ANSI.sub("", self._pending + self._decoder.decode(data))
        *finished, pending = text.split("\n")
        # Only the last redraw matters (a download may redraw for hours): keep it from its "\r" on, and what follows
        # (a "\r" that may start a "\r\n", the start of the next redraw).
        start = _ANSI_START.sub("", pending).rstrip("\r").rfind("\r")
        pending = pending[start:] if start > 0 else pending
        # A line that never ends (dots printed for hours, a huge repr) is kept as its start and latest end: it grew
        # without bound, and each read re-scanned and redrew all of it (a 2 MB line took seconds a poll).
        self._pending = _shorten(pending)
        return [_shorten(_latest_state(line)) for line in finished]

    def flush(self) -> list[str]:
        """The unfinished line (the process ended): ``[]`` when there is none."""
        last = _shorten(_latest_state(_ANSI.sub("", self._pending + self._decoder.decode(b"", final=True))))
        self._pending = ""
        self._decoder.reset()
        return [last] if last else []


def exit_message(code: int, output: str, stopped: bool = False) -> str | None:
    """What to tell the user when the engine ended: None for a normal exit or a stop. ``stopped``: the user asked
    for it, whatever the code says (Windows' TerminateProcess gives 1, the kill after an ignored SIGTERM -9)."""
    if stopped or code in (0, 15, -15):
        return None
    refused = _usage_error(output_lines(output))
    if refused is not None:
        what = _cut(refused.split(": error: ", 1)[1].rstrip("."), EXIT_TAIL_CHARS)
        return (f"The engine refused its command line ({what}). Check Application Settings > MedSIGHT > Local "
                "engine command.")
    return f"The engine stopped (exit code {code}). {_last_lines(output, EXIT_TAIL_CHARS)}".strip()


def _usage_error(lines: list[str]) -> str | None:
    """argparse's "<prog>: error: <what>" when it refused the command line: the last line, right after its usage
    text (a "usage: " line and its indented continuations). Quoting the last three lines showed the end of the usage
    ("[--adapter ADAPTER] ... [--fetch-vision]") before the error, and pushed the error's end out of the message."""
    if not lines or ": error: " not in lines[-1]:
        return None
    for line in reversed(lines[:-1]):
        if line.startswith("usage: "):
            return lines[-1]
        if not line.startswith(" "):
            return None
    return None


def _cut(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _last_lines(output: str, limit: int) -> str:
    """Up to three last lines of ``output`` in about ``limit`` characters. The last one names the error (Python's
    exception line, "medsight: error: ..."), so it is kept from its start, shortened at its end; earlier lines come
    along while they fit. (Cutting the joined lines from the front lost "torch.OutOfMemoryError: CUDA out of
    memory" from PyTorch's 500-character message.)"""
    lines = output_lines(output)[-3:]
    if not lines:
        return ""
    tail = _cut(lines.pop(), limit)
    while lines and len(lines[-1]) + 1 + len(tail) <= limit:
        tail = f"{lines.pop()} {tail}"
    return tail


def _popen_options(detached: bool) -> dict[str, Any]:
    """Keep the engine out of Slicer's process group when it must outlive Slicer; hide its console on Windows.

    On POSIX the engine always leads a session of its own, so Stop reaches everything it started: a wrapper command
    (``sh -c``, ``conda run``) that exits leaves no engine behind holding the port. Out of Slicer's group, no signal
    of Slicer's end reaches it: the pipe on its standard input tells it (see the module's docstring)."""
    if os.name == "nt":
        flags = subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        if detached:
            flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}


def _signal_tree(process: subprocess.Popen, kill: bool) -> None:
    """Ask (or, with ``kill``, force) the engine and every process it started to end."""
    if os.name == "nt":
        # TerminateProcess ends only the one process; taskkill /T takes its children too.
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       creationflags=subprocess.CREATE_NO_WINDOW)  # type: ignore[attr-defined]
        return
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)  # the engine's session is its group


def _missing_interpreter(plan: LaunchPlan) -> str | None:
    """The interpreter named on the ``#!`` line of the program ``plan`` runs, when that program exists but its
    interpreter does not (the virtual environment it was installed from was moved or deleted): the OS then says
    "No such file or directory" about a file that is there."""
    program = plan.program
    if os.path.basename(program) == program:
        program = shutil.which(program, path=plan.environment.get("PATH", os.defpath)) or ""
    try:
        with open(program, "rb") as script:
            first = script.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if not words or os.path.exists(words[0]):
        return None
    return words[0]


def _start_error(plan: LaunchPlan, err: OSError) -> str:
    """What to tell the user when the engine's program could not be started at all."""
    problem = f"cannot start {plan.program!r}: {err.strerror or err}"
    if not isinstance(err, FileNotFoundError):
        return problem
    interpreter = _missing_interpreter(plan)
    if interpreter is not None:
        return (f"cannot start {plan.program!r}: the Python it was installed with, {interpreter!r}, does not exist "
                "any more (its environment was moved or deleted). Reinstall MedSIGHT there, or give the full path of "
                "another installation's engine in Application Settings > MedSIGHT > Local engine command")
    if os.path.basename(plan.program) == plan.program:
        # Slicer started from the Finder, the Dock or a desktop menu does not see the shell's PATH.
        return (f"{problem}. Give its full path in Application Settings > MedSIGHT > Local engine command (the "
                f"output of 'which {plan.program}' or 'where {plan.program}' in the environment it is installed in)")
    return problem


class EngineProcess:
    """Runs one engine command; ``stop()`` ends it and what it started (nothing else).

    Args:
        on_output: called (from ``poll()``) with the lines the engine finished since the last call, joined by
            newlines (stdout and stderr merged, see ``OutputLines``); the unfinished last line when it exits.
        on_partial: called (from ``poll()``) with the latest state of the line being written (a progress bar)
            whenever it changed; "" when there is none any more.
        on_finished: called (from ``poll()``) with the exit code when the process has ended, also after ``stop()``.

    Besides these (the module widget's, handed on by ``rebind``), listeners (``add_listener``) are told each time an
    engine started or its end was reported, whoever caused it: the settings page keeps its note about the running
    engine true with it. All of it comes from ``start()`` and ``poll()``, which the module calls on the main thread
    (its QTimer, its buttons), so a listener may touch the GUI.
    """

    def __init__(
        self,
        on_output: Callable[[str], None] | None = None,
        on_finished: Callable[[int], None] | None = None,
        on_partial: Callable[[str], None] | None = None,
    ) -> None:
        self._process: subprocess.Popen | None = None
        self._parent_pipe: Any = None  # the write end of the engine's standard input, while it should exit with us
        self._log: Any = None
        self.log_path = ""
        self._read_at = 0
        self.rebind(on_output, on_finished, on_partial)
        self._lines = OutputLines()
        self._partial = ""
        self.output = ""
        self.detached = False
        #: ``stop()`` was called for the running (or last) engine: its exit is the user's doing, not a crash.
        self.stop_requested = False
        self._kill_at: float | None = None  # monotonic time when poll() kills an engine that ignored stop()
        self._listeners: list[Callable[[], None]] = []

    def rebind(
        self,
        on_output: Callable[[str], None] | None = None,
        on_finished: Callable[[int], None] | None = None,
        on_partial: Callable[[str], None] | None = None,
    ) -> None:
        """Report to these callbacks from now on (a reloaded module widget takes over the running engine)."""
        self._on_output = on_output
        self._on_finished = on_finished
        self._on_partial = on_partial

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each start and each reported end (a Stop, a crash), once however often added."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (nothing when it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def drop_listeners(self) -> None:
        """Forget every listener (Slicer exits)."""
        self._listeners = []

    def _tell_listeners(self) -> None:
        for listener in list(self._listeners):  # a listener may remove itself
            listener()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, plan: LaunchPlan) -> None:
        """Start the planned command; RuntimeError when it is already running or cannot be started."""
        if self.running:
            raise RuntimeError("the engine is already running; stop it first")
        # An exit the timer has not reported yet (Start enabled again in between): report it and remove its log, or
        # the crash would go unexplained and its log file stay in the temp folder.
        self.poll()
        handle, self.log_path = tempfile.mkstemp(prefix="medsight-engine-", suffix=".log")
        self._log = os.fdopen(handle, "wb")
        try:
            # The pipe's end stays here, not inheritable: no other child of Slicer holds it open after Slicer ends.
            self._process = subprocess.Popen(
                plan.argv, env=plan.environment, stdin=subprocess.DEVNULL if plan.detached else subprocess.PIPE,
                stdout=self._log, stderr=subprocess.STDOUT, **_popen_options(plan.detached),
            )
        except OSError as err:
            self._close_log()
            self._remove_log()
            raise RuntimeError(_start_error(plan, err)) from None
        self.detached = plan.detached
        self._parent_pipe = self._process.stdin
        self.output = ""
        self._read_at = 0
        self._lines = OutputLines()
        self._partial = ""
        self.stop_requested = False
        self._kill_at = None
        self._tell_listeners()

    def poll(self) -> int | None:
        """Hand new output to ``on_output``; when the process has ended, its exit code (once, to ``on_finished``)."""
        process = self._process
        if process is None:
            return None
        self._read_new_output()
        code = process.poll()
        if code is None:
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                _signal_tree(process, kill=True)  # it ignored stop(); the next poll() reports the exit
                self._kill_at = None
            return None
        if self.stop_requested:
            _signal_tree(process, kill=True)  # the command ended: what it started (behind a wrapper) ends too
        self._read_new_output()
        self._report(self._lines.flush())  # a last line without a newline (a traceback cut short, a progress bar)
        self._process = None
        self._close_parent_pipe()  # only now: closed while the engine stops, it would count as a second Ctrl+C
        self._close_log()
        self._remove_log()  # its tail is in ``output``; one file per start would pile up in the temp folder
        if self._on_finished is not None:
            self._on_finished(int(code))
        self._tell_listeners()
        return int(code)

    def stop(self, wait_s: float = 5.0, wait: bool = False) -> None:
        """Ask the engine to exit (SIGTERM on POSIX), and kill it if it still runs after ``wait_s``.

        Returns at once: ``poll()`` (the module's timer) does the kill and reports the exit, so Slicer does not freeze
        while uvicorn waits for an open answer stream to end. ``wait``: block until the engine is gone (module exit,
        where no timer will poll again)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self.stop_requested = True  # not for an engine that had already ended: its crash is still reported
            _signal_tree(process, kill=False)
            if self._kill_at is None:  # a second Stop does not postpone the kill
                self._kill_at = time.monotonic() + wait_s
            if wait:
                try:
                    process.wait(wait_s)
                except subprocess.TimeoutExpired:
                    _signal_tree(process, kill=True)
                    process.wait(wait_s)
        self.poll()

    def exit_setting_note(self, stop_on_exit: bool) -> str:
        """What "Stop the local engine when Slicer exits" (now ``stop_on_exit``) means for the engine running now: ""
        when it was started so, or none runs. How an engine ends with Slicer is fixed at its start (a pipe on its
        standard input, or none): one started to keep running and then switched to stop on exit was stopped at
        Slicer's exit, but after a crash it kept its port and memory; one switched the other way is told to keep
        running at exit, but a crash still stops it. The settings page says so beside the box."""
        if not self.running or self.detached != stop_on_exit:
            return ""
        if stop_on_exit:
            return ("The engine running now was started to keep running: it will stop when Slicer exits, but not if "
                    "Slicer crashes. Stop and start it to have it stop then too.")
        return ("The engine running now was started to stop with Slicer: it will be left running when Slicer exits, "
                "but a crash of Slicer still stops it. Stop and start it to keep it running then too.")

    def finished_message(self, code: int) -> str | None:
        """What to tell the user about the exit ``code`` ``on_finished`` got: None after a normal exit or a stop."""
        return exit_message(code, self.output, stopped=self.stop_requested)

    def release(self) -> None:
        """Forget a detached engine without stopping it (Slicer exits and the user wants it kept).

        Its log file is removed: no later session reads it (it does not know that engine), and it stayed in the temp
        folder forever, growing while the engine ran. On POSIX the engine keeps writing into the removed file, whose
        space comes back when the engine exits; Windows refuses to remove a file another process holds open, so there
        it stays. An engine that watches its standard input is told to keep running before the pipe closes (the user
        unchecked "stop on exit" after starting it). Listeners are not told: Slicer is exiting."""
        if self._parent_pipe is not None:
            with contextlib.suppress(OSError):  # it has just ended: nothing to keep running
                self._parent_pipe.write(KEEP_RUNNING_LINE)
                self._parent_pipe.flush()
        self._close_parent_pipe()
        self._process = None
        self._close_log()
        self._remove_log()

    def _read_new_output(self) -> None:
        if not self.log_path:
            return
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._read_at)
                data = log.read()
        except OSError:
            return
        if not data:
            return
        self._read_at += len(data)
        self._report(self._lines.feed(data))

    def _report(self, lines: list[str]) -> None:
        """Hand finished ``lines`` to ``on_output`` and a changed unfinished line to ``on_partial``."""
        if lines:
            text = "\n".join(lines)
            # Keep only the tail: the engine can run for days, and only its last lines matter for an error.
            self.output = (self.output + text + "\n")[-_TAIL_CHARS:]
            if self._on_output is not None:
                self._on_output(text)
        partial = self._lines.partial
        if partial != self._partial:
            self._partial = partial
            if self._on_partial is not None:
                self._on_partial(partial)

    def _remove_log(self) -> None:
        if self.log_path:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)
            self.log_path = ""

    def _close_parent_pipe(self) -> None:
        if self._parent_pipe is not None:
            with contextlib.suppress(OSError):
                self._parent_pipe.close()
            self._parent_pipe = None

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def replaced_by_reload(cls: type) -> bool:
    """Whether the module widget class ``cls`` was replaced by a developer Reload, so its cleanup() is not Slicer's
    exit. slicer.util.reloadScriptedModule (the Reload button, or called from the Python console) runs the module
    file again, which makes a new class in the module (v5.8.0 Base/Python/slicer/util.py:1428-1430 into the same
    module, v5.10.0 util.py:1428-1431 into a new one in sys.modules), before it calls the old widget's cleanup(); at
    exit the module still holds ``cls``."""
    current = getattr(sys.modules.get(cls.__module__), cls.__name__, None)
    return current is not None and current is not cls


def leave_engine(engine: EngineProcess, stop_on_exit: bool, reloading: bool) -> EngineProcess | None:
    """What the module widget's cleanup does with the engine it started; returns the engine to hand on, or None.

    Slicer calls cleanup() when it exits and when a developer reloads the module (``ScriptedLoadableModuleWidget.
    onReload`` -> ``slicer.util.reloadScriptedModule``: cleanup, then a new widget in the same Slicer). A reload
    replaces the widget, not the session: the running engine (and the model it loaded) is handed on to the new
    widget, whatever "stop on exit" says. At exit it is stopped (waiting: no timer polls after this) or, when the
    user wants it kept, released to run on; its listeners (the settings page) are dropped first: at exit there is
    nothing left to show, and the rest of the cleanup (the settings' save) should not depend on the settings dialog's
    widgets still being there."""
    if not reloading:
        engine.drop_listeners()
    if not engine.running:
        # An exit the timer had not reported yet (it polls twice a second): report it, which removes its log file,
        # left in the temp folder for good otherwise.
        engine.poll()
        return None
    if reloading:
        return engine
    if stop_on_exit:
        engine.stop(wait=True)
    else:
        engine.release()
    return None
