"""`medsight serve --exit-with-parent`: the watch on standard input stops the engine when the program holding the
pipe's other end has ended, whatever the OS; a `keep-running` line turns it off. The whole engine, killed with the
3D Slicer module that started it, is tested in Testing/MedSIGHTSlicerLib/test_engine_process.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from medsight.cli import _parser
from medsight.server.parent_watch import (
    EXIT_WITH_PARENT_VARIABLE,
    KEEP_RUNNING,
    exit_with_parent_wanted,
    watch_parent,
)


def _watched_pipe():
    """A pipe whose read end is watched: (write end, event set when the watch says the parent is gone, thread)."""
    read_fd, write_fd = os.pipe()
    gone = threading.Event()
    thread = watch_parent(os.fdopen(read_fd, "rb"), on_gone=gone.set)
    return os.fdopen(write_fd, "wb"), gone, thread


def test_end_of_input_stops_at_once_and_says_why(capfd):
    writer, gone, thread = _watched_pipe()
    writer.write(b"some other line\n" + b"x" * 1000 + b"\n")  # not the program's line: still watching
    writer.flush()
    assert not gone.wait(0.3)
    closed = time.monotonic()
    writer.close()  # what the OS does when the program holding it ends, however it ends
    assert gone.wait(5)
    took = time.monotonic() - closed
    thread.join(5)
    assert took < 3.0 and not thread.is_alive()
    err = capfd.readouterr().err
    assert "standard input closed: the program that started the engine has ended; stopping" in err


def test_keep_running_turns_the_watch_off(capfd):
    writer, gone, thread = _watched_pipe()
    writer.write(KEEP_RUNNING + b"\n")
    writer.flush()
    thread.join(5)
    assert not thread.is_alive()
    writer.close()
    assert not gone.wait(0.3)  # the end of input that follows stops nothing
    assert "left running by the program that started it" in capfd.readouterr().err


@pytest.mark.parametrize(("option", "value", "wanted"), [
    (True, None, True), (False, None, False), (False, "1", True), (False, " yes ", True), (False, "0", False),
    (False, "false", False), (False, "", False), (True, "0", True),
])
def test_the_option_or_the_environment_variable_asks_for_it(option, value, wanted):
    environment = {} if value is None else {EXIT_WITH_PARENT_VARIABLE: value}
    assert exit_with_parent_wanted(option, environment) is wanted


def test_serve_help_names_the_option_and_its_variable():
    serve = _parser()._subparsers._group_actions[0].choices["serve"]
    text = " ".join(serve.format_help().split())
    assert "--exit-with-parent" in text and f"{EXIT_WITH_PARENT_VARIABLE}=1" in text
    assert serve.parse_args(["--exit-with-parent"]).exit_with_parent
    assert not serve.parse_args([]).exit_with_parent


_CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job inherits it
from medsight.server.parent_watch import watch_parent
try:  # the interrupt may land as soon as "watching" is read, before the sleep: inside the try all the same
    watch_parent()
    print("watching", flush=True)
    time.sleep(60)  # the model's load
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGINT's disposition is inherited on POSIX")
def test_the_watch_interrupts_a_load_even_when_sigint_was_ignored():
    """Before the server runs, the watch stops the engine with Ctrl+C's KeyboardInterrupt: it must reach the main
    thread also when the engine inherited SIGINT ignored (``interrupt_main`` then did nothing, and an engine whose
    parent died during the load served on)."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline() == b"watching\n"
        closed = time.monotonic()
        child.stdin.close()
        code = child.wait(10)
        took = time.monotonic() - closed
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
    out, err = child.stdout.read(), child.stderr.read()
    assert code == 130 and out == b"interrupted\n" and took < 5.0, err
    assert b"stopping" in err


_REFUSES = """
import sys
from medsight.server.parent_watch import watch_parent
watch_parent()
print("watching", flush=True)
sys.exit(2)  # as a refused command ends, the watch still reading
"""


def test_an_exit_while_watching_keeps_its_exit_status():
    """The watch read standard input through `sys.stdin`, holding its buffer's lock while it waited: every exit
    through Python's shutdown waited 1 s for the lock and then aborted (status -6, SIGABRT, "Fatal Python error")."""
    child = subprocess.Popen([sys.executable, "-c", _REFUSES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child.wait(timeout=30)  # its standard input held open throughout, as the parent holds it (a few bytes out)
        out, err = child.stdout.read(), child.stderr.read()
    finally:
        child.kill()
        child.stdin.close()
    assert (child.returncode, out) == (2, b"watching\n"), err
    assert b"Fatal Python error" not in err, err


_TERMINALS: list[int] = []  # the pseudo-terminals' other ends, kept open: closed, isatty() says False


def _terminal():
    import pty  # POSIX only: the test using it is skipped on Windows

    main, follower = pty.openpty()
    _TERMINALS.append(main)
    return os.fdopen(follower, "rb")


@pytest.mark.parametrize(("opened", "kind"), [
    (lambda tmp_path: open(os.devnull, "rb"), "a device such as /dev/null"),  # noqa: SIM115 (used in a with)
    (lambda tmp_path: (tmp_path / "in.txt").open("w+b"), "a file"),
    pytest.param(lambda tmp_path: _terminal(), "a terminal",
                 marks=pytest.mark.skipif(os.name == "nt", reason="a pseudo-terminal is POSIX's")),
])
def test_a_standard_input_no_program_holds_is_refused_before_the_watch_starts(tmp_path, opened, kind):
    """An engine started by hand with the option (or the variable left in the shell) and /dev/null or a file as its
    input stopped after its load, saying the program that started it had ended; on a terminal it read the terminal."""
    with opened(tmp_path) as stream:
        threads = threading.active_count()
        with pytest.raises(ValueError, match=f"standard input is {kind}, not a pipe") as refused:
            watch_parent(stream, on_gone=lambda: None)
        assert threading.active_count() == threads  # no watch left behind
        assert EXIT_WITH_PARENT_VARIABLE in str(refused.value) and "\n" not in str(refused.value)


def test_a_socket_is_watched_as_a_pipe_is():
    import socket

    ours, theirs = socket.socketpair()
    gone = threading.Event()
    with theirs.makefile("rb") as stream:
        thread = watch_parent(stream, on_gone=gone.set)
        ours.close()
        assert gone.wait(5)
        thread.join(5)
    theirs.close()


def test_the_engine_stops_also_when_its_stderr_reader_has_gone_with_the_parent(monkeypatch):
    """A program that held the engine's stderr through a pipe too (not the Slicer module: it gives a log file) takes
    its reader with it when it ends: the watch's 'stopping' line raised BrokenPipeError and the engine ran on."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    broken = os.fdopen(write_fd, "w")
    monkeypatch.setattr(sys, "stderr", broken)
    writer, gone, thread = _watched_pipe()
    writer.close()
    stopped = gone.wait(5)
    thread.join(5)
    monkeypatch.undo()
    with contextlib.suppress(BrokenPipeError):  # the line the watch could not write is still in its buffer
        broken.close()
    assert stopped and not thread.is_alive()
