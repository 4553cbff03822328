"""`medsight serve --exit-with-parent`: the engine stops when the program that started it has ended, on every OS.

That program (the 3D Slicer module) gives the engine a pipe as its standard input and holds the pipe's other end
without writing to it. However the program ends (its exit, a crash, SIGKILL, Windows' Task Manager) the OS closes its
end, and a read here returns end of file: the engine then stops as Ctrl+C stops it (uvicorn's handler: open asks get
their grace, the job queue writes their log and audit lines), or, while the model still loads, at once. Linux's
prctl(PR_SET_PDEATHSIG) exists on one OS only and fires when the parent's *thread* ends; the engine's own session
(the module stops its whole process group) takes it out of Slicer's group, so nothing else ends it.

A line ``keep-running`` from the program turns the watch off: it is leaving the engine running on purpose (the user
unchecked "Stop the local engine when Slicer exits" after starting it).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from typing import BinaryIO

__all__ = ["EXIT_WITH_PARENT_VARIABLE", "KEEP_RUNNING", "exit_with_parent_wanted", "watch_parent"]

#: Set to 1 in the environment: as ``--exit-with-parent`` (an environment variable also reaches an engine behind a
#: wrapper command such as ``conda run``, and an older engine ignores it).
EXIT_WITH_PARENT_VARIABLE = "MEDSIGHT_EXIT_WITH_PARENT"
#: The line that turns the watch off.
KEEP_RUNNING = b"keep-running"
#: The longest line read at once: the program writes nothing else, so anything longer is not its line.
_LINE_BYTES = 256


def exit_with_parent_wanted(option: bool, environment: Mapping[str, str]) -> bool:
    """``--exit-with-parent`` or ``MEDSIGHT_EXIT_WITH_PARENT=1`` (any value but "", "0", "false", "no", "off")."""
    value = environment.get(EXIT_WITH_PARENT_VARIABLE, "").strip().lower()
    return option or value not in ("", "0", "false", "no", "off")


def _interrupt() -> None:
    """Stop the engine as Ctrl+C does: SIGINT's handler runs in the main thread (uvicorn's while it serves, Python's
    KeyboardInterrupt while the model loads). On POSIX a real SIGINT to the main thread, which also wakes a blocking
    call there; ``interrupt_main`` alone (Windows has no such signals) waits for the main thread's next bytecode."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


def _not_a_pipe(stream: BinaryIO) -> str | None:
    """What ``stream`` is when it is no pipe (or socket) another program can hold: "a terminal", "a device such as
    /dev/null", "a file"; None for a pipe, or a stream with no file behind it (a test's)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return None
    if stream.isatty():
        return "a terminal"
    return "a device such as /dev/null" if stat.S_ISCHR(mode) else "a file"


def _own_reader(stdin: BinaryIO) -> BinaryIO:
    """Standard input through a descriptor of the watch's own, unbuffered. Read through `sys.stdin`, the waiting
    thread held its buffer's lock, and every exit through Python's shutdown (a refusal such as a port out of range,
    Ctrl+C) waited 1 s for that lock, then aborted: "Fatal Python error: ... could not acquire lock for
    <_io.BufferedReader name='<stdin>'>", exit status SIGABRT instead of 2 or 0. A stream without a descriptor (a
    test's) is read as it is."""
    try:
        descriptor = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return stdin
    return open(os.dup(descriptor), "rb", buffering=0)  # the watch's thread reads it until the process ends


def watch_parent(stream: BinaryIO | None = None, on_gone: Callable[[], None] = _interrupt) -> threading.Thread:
    """Read ``stream`` (default: standard input) in a daemon thread; at end of file say why and call ``on_gone``.

    ValueError when there is no standard input to watch (a Windows GUI launcher gives none). SIGINT gets Python's
    handler when it had none (a shell's background job inherits it ignored): Ctrl+C's stop must reach the model's
    load too, not only the server, whose handler uvicorn sets itself.

    ValueError too when standard input is no pipe (an engine started by hand with the option, or with the variable
    left in the shell): /dev/null (docker without -i, systemd, nohup) or a file ends at once, which stopped the
    engine after its load saying that "the program that started the engine has ended", and a terminal would be read
    (Ctrl+D stopped the engine; a background job reading it is stopped by SIGTTIN)."""
    standard_input = stream is None
    if standard_input:
        if sys.stdin is None:
            raise ValueError("--exit-with-parent: the engine has no standard input to watch; start it with a pipe "
                             "on its standard input, held open by the program it is to exit with")
        stream = sys.stdin.buffer
    kind = _not_a_pipe(stream)
    if kind is not None:
        raise ValueError(f"--exit-with-parent (or {EXIT_WITH_PARENT_VARIABLE}=1): standard input is {kind}, not a "
                         "pipe held by the program the engine is to exit with; start the engine without it")
    if standard_input:
        stream = _own_reader(stream)
    if on_gone is _interrupt and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        try:
            for line in iter(lambda: stream.readline(_LINE_BYTES), b""):
                if line.strip() == KEEP_RUNNING:
                    print("medsight serve: left running by the program that started it", file=sys.stderr, flush=True)
                    return
            why = "standard input closed: the program that started the engine has ended"
        except OSError as err:  # the pipe broke in another way than an end of file: its writer is gone all the same
            why = f"standard input unreadable ({err.strerror or err}): the program that started the engine is gone"
        # The program that held the pipe may have held our stderr's reader too: a BrokenPipeError here ended this
        # thread before the stop, and the engine ran on.
        with contextlib.suppress(OSError, ValueError):
            print(f"medsight serve: {why}; stopping (pid {os.getpid()})", file=sys.stderr, flush=True)
        on_gone()

    thread = threading.Thread(target=watch, name="medsight-parent-watch", daemon=True)
    thread.start()
    return thread
