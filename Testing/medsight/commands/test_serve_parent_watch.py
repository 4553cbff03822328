"""`medsight serve --exit-with-parent` (or its environment variable) watches its parent from the start: a parent
that has ended stops the engine before the parser's imports (torch, the image readers) and the model's load, not
after them (20 s and more in which the engine loaded on for nothing). The watch itself is tested in
Testing/medsight/server/test_parent_watch.py; an engine killed with the Slicer that started it in
Testing/MedSIGHTSlicerLib/test_engine_process.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from medsight.server.parent_watch import EXIT_WITH_PARENT_VARIABLE
from medsight_testing.child_engine import checkout_env, imported_modules
from medsight_testing.processes import free_port


@pytest.mark.skipif(os.name == "nt", reason="a pipe's end handed over as a file descriptor: POSIX")
@pytest.mark.parametrize("asked_by", ["option", "variable"])
def test_a_parent_gone_at_the_start_stops_serve_before_torch_isimported_modules(asked_by):
    read_fd, write_fd = os.pipe()
    os.close(write_fd)  # the parent's end: closed, as a crashed parent's is
    command = [sys.executable, "-X", "importtime", "-m", "medsight.cli", "serve", "--model", "tiny", "--port",
               str(free_port())]
    env = checkout_env()
    if asked_by == "option":
        command.append("--exit-with-parent")
        env.pop(EXIT_WITH_PARENT_VARIABLE, None)
    else:
        env[EXIT_WITH_PARENT_VARIABLE] = "1"
    start = time.monotonic()
    try:
        served = subprocess.run(command, stdin=read_fd, capture_output=True, text=True, env=env, timeout=120)
    finally:
        os.close(read_fd)
    took = time.monotonic() - start
    assert served.returncode == 130, served.stderr[-2000:]
    assert "standard input closed: the program that started the engine has ended; stopping" in served.stderr
    assert "\nmedsight: interrupted\n" in served.stderr, served.stderr[-2000:]  # importtime may list more after it
    imported = imported_modules(served.stderr)
    assert "medsight.commands.serve" in imported  # the engine's imports are listed: the check below sees torch's
    assert "torch" not in imported and "medsight.engine" not in imported  # before: both, and the model loaded
    assert took < 10.0, f"it took {took:.1f} s"  # 0.4 s measured on a loaded 2-core machine; before: 23 s


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to the main thread: POSIX (Windows' interrupt_main is not run)")
def test_a_parent_gone_during_the_imports_stops_serve_before_the_model_loads():
    """The parent's end of the pipe closes once torch is imported (while the parser's other imports run): the
    engine stops there, and imports neither the engine nor its server, let alone loading the model."""
    env = checkout_env(**{EXIT_WITH_PARENT_VARIABLE: "1"})
    child = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "medsight.cli", "serve", "--model", "tiny",
                              "--port", str(free_port())], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    lines: list[str] = []
    torch_imported = threading.Event()

    def read() -> None:
        for line in child.stderr:
            lines.append(line)
            if line.startswith("import time:") and line.rsplit("|", 1)[1].strip() == "torch":
                torch_imported.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert torch_imported.wait(120), "".join(lines)[-2000:]
        closed = time.monotonic()
        child.stdin.close()
        code = child.wait(60)
        took = time.monotonic() - closed
        reader.join(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stderr = "".join(lines)
    assert code == 130 and "\nmedsight: interrupted\n" in stderr, stderr[-2000:]
    imported = imported_modules(stderr)
    assert "torch" in imported and not {"medsight.engine", "medsight.server.app"} & imported
    assert took < 10.0, f"it took {took:.1f} s"  # the interpreter's exit after torch's import: 1-3 s measured


def test_a_refused_serve_with_the_watch_on_ends_with_its_own_message_and_status():
    """Before the fix the watch's thread held the lock of `sys.stdin` while it waited, and the refusal's exit waited
    1 s for it, then aborted: status -6 (SIGABRT) and "Fatal Python error" after the refusal's line, as it is in the
    Slicer module's engine log."""
    served = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--port", "99999", "--exit-with-parent"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=checkout_env())
    try:
        served.wait(timeout=120)  # standard input held open, as the parent holds it (its 2 kB of usage fit the pipe)
        err = served.stderr.read()
    finally:
        served.kill()
        served.stdin.close()
    assert served.returncode == 2, err[-2000:]
    assert err.endswith("medsight serve: error: argument --port: 99999 is outside 1..65535\n"), err[-2000:]
