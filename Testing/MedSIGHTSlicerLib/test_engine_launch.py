"""Start local engine: command splitting (Windows rules on every OS), the child's environment, detached starts, and a
real engine answering /v1/health while the host carries a foreign Python's variables (issue 18, defects 1, 3, 13).

Needs no MRML and no Qt: it also runs under Slicer's Pythons (scripts/test_slicer_pythons.sh).
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

from medsight_testing.processes import alive, free_port, installed_engine, wait_for
from MedSIGHTSlicerLib.engine_launch import (
    DEFAULT_SERVE_COMMAND,
    EXIT_WITH_PARENT_VARIABLE,
    PYTHON_VARIABLES,
    engine_environment,
    launch_plan,
    split_command,
    startup_environment,
)
from MedSIGHTSlicerLib.engine_process import (
    EXIT_TAIL_CHARS,
    LINE_CHARS,
    EngineProcess,
    OutputLines,
    exit_message,
    leave_engine,
    output_lines,
)
from MedSIGHTSlicerLib.settings import ConnectionSettings

# Microsoft's documented examples of the C runtime's argument parsing, plus the paths users paste.
WINDOWS_CASES = [
    (r"C:\Users\me\.venv\Scripts\medsight.exe serve", [r"C:\Users\me\.venv\Scripts\medsight.exe", "serve"]),
    (r'"C:\Program Files\MedSIGHT\medsight.exe" serve --port 8765',
     [r"C:\Program Files\MedSIGHT\medsight.exe", "serve", "--port", "8765"]),
    (r'medsight serve --model "D:\models\medsight full\\"',
     ["medsight", "serve", "--model", "D:\\models\\medsight full\\"]),
    (r'"abc" d e', ["abc", "d", "e"]),
    (r'a\\b d"e f"g h', [r"a\\b", "de fg", "h"]),
    (r'a\\\"b c d', [r'a\"b', "c", "d"]),
    (r'a\\\\"b c" d e', [r"a\\b c", "d", "e"]),
    (r'a"b"" c d', ['ab" c d']),
    ('  spaced\t\targs  ', ["spaced", "args"]),
    ('empty "" arg', ["empty", "", "arg"]),
]


@pytest.mark.parametrize(("command", "expected"), WINDOWS_CASES)
def test_windows_commands_survive_splitting(command, expected):
    assert split_command(command, windows=True) == expected


def test_posix_splitting_and_errors():
    assert split_command("/opt/venv/bin/medsight serve --port 8765", windows=False) == [
        "/opt/venv/bin/medsight", "serve", "--port", "8765"]
    assert split_command("'/my dir/medsight' serve", windows=False) == ["/my dir/medsight", "serve"]
    with pytest.raises(ValueError, match="empty"):
        split_command("   ", windows=True)
    with pytest.raises(ValueError, match="cannot read"):
        split_command('medsight "serve', windows=False)


def test_engine_environment_drops_python_variables():
    host = {"PATH": "/usr/bin", "HOME": "/home/me", "PYTHONHOME": "/slicer/lib/Python",
            "PYTHONPATH": "/slicer/lib/Python/lib/python3.9", "PYTHONNOUSERSITE": "1", "pythonpath": "x"}
    env = engine_environment(host)
    assert not {k.upper() for k in env} & set(PYTHON_VARIABLES)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/me" and env["PYTHONUNBUFFERED"] == "1"
    assert engine_environment({"PYTHONIOENCODING": "cp1252"})["PYTHONIOENCODING"] == "utf-8"  # what the log reads
    assert "PYTHONHOME" in host  # the host's own environment is left alone


#: A line an engine prints about a user's files: a Western accent, Japanese (outside every Western code page), a sign.
NON_ASCII_LINE = "model folder /home/Jos\u00e9/\u809d\u81d3 (5 \u00b5m)"


def test_only_an_engine_to_stop_with_slicer_is_told_to_exit_with_it():
    """"Stop on exit" asks the engine to watch the pipe the module holds (MEDSIGHT_EXIT_WITH_PARENT); an engine kept
    running must not, even when the user's own environment carries the variable (it would stop with Slicer)."""
    base = {**os.environ, EXIT_WITH_PARENT_VARIABLE: "1"}
    assert launch_plan("medsight serve", base, stop_on_exit=True).environment[EXIT_WITH_PARENT_VARIABLE] == "1"
    assert launch_plan("medsight serve", {}, stop_on_exit=True).environment[EXIT_WITH_PARENT_VARIABLE] == "1"
    kept = launch_plan("medsight serve", base, stop_on_exit=False).environment
    assert EXIT_WITH_PARENT_VARIABLE not in kept and kept["PATH"] == base["PATH"]


def test_the_engine_writes_its_output_in_the_encoding_the_log_is_read_in():
    """The log is decoded as UTF-8; a Python on Windows writes a file in the ANSI code page (cp1252 on a Western
    system), so "é" arrived as U+FFFD and a character outside that page ended the engine with a UnicodeEncodeError.
    The host's environment carries that code page here (a stand-in for Windows' default); the engine writes UTF-8."""
    code = f"print({NON_ASCII_LINE.encode('ascii', 'backslashreplace').decode()!r})"
    finished = []
    process = EngineProcess(on_finished=finished.append)
    process.start(launch_plan(f'"{sys.executable}" -c "{code}"', dict(os.environ, PYTHONIOENCODING="cp1252"), True))
    assert wait_for(lambda: process.poll() is not None or finished, 30)
    assert finished == [0], process.output
    assert output_lines(process.output) == [NON_ASCII_LINE]


def test_startup_environment_comes_from_slicer_when_there():
    util = types.SimpleNamespace(startupEnvironment=lambda: {"PATH": "/before/slicer", "": "dropped"})
    assert startup_environment(util) == {"PATH": "/before/slicer"}
    assert startup_environment(None) == dict(os.environ)


def test_default_command_serves_the_embedded_demo_model():
    program, *arguments = split_command(DEFAULT_SERVE_COMMAND)
    assert Path(program).name == "medsight" and arguments[0] == "serve"
    model = arguments[arguments.index("--model") + 1]
    assert model == "demo"
    # A default saved by an older version (serving random weights) reads back as today's default.
    store = {"MedSIGHT/serveCommand": "medsight serve --model tiny --host 127.0.0.1 --port 8765"}
    loaded = ConnectionSettings.load(types.SimpleNamespace(value=lambda k, d=None: store.get(k, d)))
    assert loaded.serve_command == DEFAULT_SERVE_COMMAND
    store["MedSIGHT/serveCommand"] = "medsight serve --model tiny --port 9000"  # the user's own choice is kept
    loaded = ConnectionSettings.load(types.SimpleNamespace(value=lambda k, d=None: store.get(k, d)))
    assert loaded.serve_command.endswith("9000")


def test_settings_detect_real_connection_changes():
    settings = ConnectionSettings()
    assert not settings.set_connection(settings.url, settings.token)  # leaving a field unchanged
    assert not settings.set_connection(f"  {settings.url} ", "")  # only whitespace differs
    assert settings.set_connection("http://127.0.0.1:9000", "")
    assert settings.set_connection("http://127.0.0.1:9000", "secret")
    assert not settings.set_connection("http://127.0.0.1:9000", "secret")


@pytest.mark.parametrize(("command", "url", "served"), [
    ("medsight serve --model demo --port 9000", "http://127.0.0.1:8765", 9000),
    ('"C:\\Program Files\\medsight.exe" serve --port=9001', "http://localhost:8765/", 9001),
    ("conda run -n ms medsight serve --port 8000 --port 9002", "http://[::1]:8765", 9002),  # argparse keeps the last
    ("medsight serve --model demo", "http://127.0.0.1:9000", 8765),  # the engine's default port
    ("medsight serve --po 9000", "http://127.0.0.1:8765", 9000),  # argparse takes an unambiguous abbreviation
])
def test_a_local_engine_on_another_port_than_the_url_is_named(command, url, served):
    """"Start local engine" with a command serving one port and an engine URL naming another: the engine ran, its log
    said where it listened, and every question said "cannot reach the MedSIGHT engine ... Is the engine running?"."""
    url_port = int(url.rstrip("/").rsplit(":", 1)[1])
    message = ConnectionSettings(url=url, serve_command=command).port_mismatch(windows=False)
    assert message is not None and f"serves port {served}" in message and f"names port {url_port}" in message
    question = ConnectionSettings(url=url, serve_command=command).start_question(windows=False)
    assert question == f"{message}\n\nStart the engine anyway?"  # asked before "Start local engine" starts it
    fixed = url.replace(f":{url_port}", f":{served}")
    assert ConnectionSettings(url=fixed, serve_command=command).port_mismatch(windows=False) is None
    assert ConnectionSettings(url=fixed, serve_command=command).start_question(windows=False) is None
    # Another computer's engine, an unreadable command, or no serve command: nothing to compare.
    for other_url, other_command in (("http://gpu.example.org:8765", command), (url, 'medsight serve "'),
                                     (url, "python -m http.server 8765")):
        assert ConnectionSettings(url=other_url, serve_command=other_command).port_mismatch(windows=False) is None


def test_whitespace_only_engine_output_has_no_lines():
    """The old status-line code took ``splitlines()[-1]`` of the output and raised on "\\n  \\n"."""
    assert output_lines("\n  \r\n\t") == []
    assert output_lines("loading\n\nMedSIGHT engine on http://127.0.0.1:8765/v1  \n") == [
        "loading", "MedSIGHT engine on http://127.0.0.1:8765/v1"]


def test_exit_messages():
    assert exit_message(0, "bye") is None and exit_message(-15, "") is None
    message = exit_message(1, "Traceback ...\nModuleNotFoundError: No module named 'encodings'\n\n")
    assert message.startswith("The engine stopped (exit code 1).") and "encodings" in message
    assert exit_message(1, "", stopped=True) is None and exit_message(-9, "", stopped=True) is None


# PyTorch's message when the full model does not fit the GPU (c10/cuda/CUDACachingAllocator.cpp), as the engine's
# last line: what failed comes first, the advice after it.
CUDA_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
            "23.55 GiB of which 5.06 MiB is free. Including non-PyTorch memory, this process has 23.53 GiB memory in "
            "use. Of the allocated memory 23.10 GiB is allocated by PyTorch, and 113.53 MiB is reserved by PyTorch but "
            "unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
            "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def test_a_crash_message_keeps_the_start_of_a_long_last_line():
    """The exit message quoted the last EXIT_TAIL_CHARS characters of the joined last lines: of PyTorch's OOM line
    that is its advice, without "CUDA out of memory". Now the last line is kept from its start."""
    assert len(CUDA_OOM) > EXIT_TAIL_CHARS
    output = f"Traceback (most recent call last):\n  File \"engine.py\", line 3, in load\n{CUDA_OOM}\n"
    message = exit_message(1, output)
    quoted = message.removeprefix("The engine stopped (exit code 1). ")
    assert quoted.startswith("torch.OutOfMemoryError: CUDA out of memory.")
    assert len(quoted) == EXIT_TAIL_CHARS and quoted.endswith("...")
    assert CUDA_OOM.startswith(quoted[:-3])
    # Short lines still come together, the last one whole.
    error = "medsight: error: cannot listen on 127.0.0.1:8765"
    assert exit_message(2, f"loading\nmodel ready\n{error}\n") == (
        f"The engine stopped (exit code 2). loading model ready {error}")


def _argparse_output(argv: list[str]) -> tuple[int, str]:
    """What a real argparse parser like the engine's (a usage text that wraps) prints when it refuses ``argv``."""
    import argparse
    import contextlib
    import io

    parser = argparse.ArgumentParser(prog="medsight serve")
    for name in ("model", "vision-file", "host", "port", "token-file", "allow-host", "device", "max-upload-mb",
                 "timeout", "max-waiting", "ask-memory-mb", "threads", "audit", "adapter"):
        parser.add_argument(f"--{name}", type=int if name == "port" else str)
    out = io.StringIO()
    with contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exited:
        parser.parse_args(argv)
    return int(exited.value.code), out.getvalue()


@pytest.mark.parametrize("argv", [["--port", "abc"], ["--bogus", "1"]])
def test_a_refused_command_line_is_named_without_the_usage_text(argv):
    """A wrong argument in the engine command: the message quoted argparse's last three lines, the end of its usage
    ("[--ask-memory-mb ASK_MEMORY_MB] ...") before the error; now the error alone, and where to fix it."""
    code, output = _argparse_output(argv)
    usage = output_lines(output)[:-1]
    assert len(usage) > 1 and usage[0].startswith("usage: ")  # the usage wraps over several lines
    message = exit_message(code, output)
    error = output_lines(output)[-1].split(": error: ", 1)[1]
    assert message == (f"The engine refused its command line ({error}). Check Application Settings > MedSIGHT > "
                       "Local engine command.")
    assert not any(line.strip() in message for line in usage)


def _says_up(process: EngineProcess) -> bool:
    process.poll()
    return "engine up" in process.output


def _sleeper(stop_on_exit: bool):
    command = f'"{sys.executable}" -c "import time; print(\'engine up\'); time.sleep(120)"'
    return launch_plan(command, os.environ, stop_on_exit=stop_on_exit)


def test_engine_process_start_output_and_stop():
    lines, finished = [], []
    process = EngineProcess(on_output=lines.append, on_finished=finished.append)
    process.start(_sleeper(stop_on_exit=True))
    assert process.running
    assert wait_for(lambda: _says_up(process), 30), process.output
    assert "engine up" in "".join(lines)
    log = Path(process.log_path)
    assert log.is_file()
    process.stop()  # returns at once; poll() (the module's timer) reports the exit
    assert wait_for(lambda: process.poll() is not None or finished, 10)
    assert not process.running and len(finished) == 1
    assert not log.exists() and "engine up" in process.output  # its tail is kept, the file is not
    with pytest.raises(RuntimeError, match="cannot start") as refused:
        process.start(launch_plan("/nonexistent/medsight serve", os.environ, True))
    assert "full path" not in str(refused.value)  # a path that does not exist is wrong, not just not found on PATH
    with pytest.raises(RuntimeError, match="Give its full path in Application Settings") as refused:
        process.start(launch_plan("medsight-not-on-this-path serve", os.environ, True))
    assert "which medsight-not-on-this-path" in str(refused.value) and not process.log_path


@pytest.mark.skipif(os.name == "nt", reason="Windows runs no #! scripts; pip's .exe launchers report it themselves")
@pytest.mark.parametrize("by_name", [False, True])
def test_an_engine_whose_python_is_gone_is_named_as_such(tmp_path, by_name):
    """A medsight script whose environment was moved or deleted: the OS says "No such file or directory" about a
    script that is there. The message names the missing Python (it named only the script, and for a bare name
    told the user to give the full path of a program that was found)."""
    gone = tmp_path / "old-venv" / "bin" / "python"
    script = tmp_path / "bin" / "medsight-moved"
    script.parent.mkdir()
    script.write_text(f"#!{gone}\nprint('engine up')\n")
    script.chmod(0o755)
    environment = dict(os.environ, PATH=f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = f"{script.name if by_name else shlex.quote(str(script))} serve"
    process = EngineProcess()
    with pytest.raises(RuntimeError) as refused:
        process.start(launch_plan(command, environment, True, windows=False))
    message = str(refused.value)
    assert repr(str(gone)) in message and "does not exist" in message and "full path of" in message
    assert "which" not in message and not process.log_path


def _engine_like(on_sigterm: str):
    """A child that prints "engine up" once its SIGTERM handler is set: ``exit1`` exits with 1 (what Windows'
    TerminateProcess gives after Stop), ``ignore`` ignores it (uvicorn waiting for an open answer stream)."""
    handler = {"exit1": "lambda *_: sys.exit(1)", "ignore": "signal.SIG_IGN"}[on_sigterm]
    code = (f"import signal, sys, time; signal.signal(signal.SIGTERM, {handler}); print('engine up'); "
            "time.sleep(120)")
    return launch_plan(f'"{sys.executable}" -c "{code}"', os.environ, stop_on_exit=True)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals stand in for TerminateProcess' exit code 1")
def test_a_requested_stop_is_reported_as_stopped_whatever_the_exit_code():
    finished = []
    process = EngineProcess(on_finished=finished.append)
    process.start(_engine_like("exit1"))
    assert wait_for(lambda: _says_up(process), 30), process.output
    process.stop()
    assert wait_for(lambda: process.poll() is not None or finished, 10)
    assert finished == [1]
    assert process.finished_message(1) is None  # the user's Stop, not "The engine stopped (exit code 1)"

    # A crash the timer had not reported yet when the user pressed Stop is still explained.
    process.start(launch_plan(f'"{sys.executable}" -c "import sys; print(\'boom\'); sys.exit(3)"', os.environ, True))
    assert wait_for(lambda: not process.running, 30)
    process.stop()
    assert finished == [1, 3] and process.finished_message(3) == "The engine stopped (exit code 3). boom"

    # The same exit without a Stop is still explained.
    process.start(launch_plan(f'"{sys.executable}" -c "import sys; print(\'boom\'); sys.exit(1)"', os.environ, True))
    assert not process.stop_requested
    assert wait_for(lambda: process.poll() is not None, 30)
    assert finished == [1, 3, 1]
    assert process.finished_message(1) == "The engine stopped (exit code 1). boom"


def test_a_start_after_an_unreported_exit_reports_it_and_removes_its_log():
    """Start again before the timer's poll() saw the last engine end: that exit is still reported (with its output)
    and its log file removed; they used to be lost, the file left in the temp folder."""
    finished = []
    process = EngineProcess(on_finished=finished.append)
    crash = launch_plan(f'"{sys.executable}" -c "import sys; print(\'boom\'); sys.exit(3)"', os.environ, True)
    process.start(crash)
    first_log = Path(process.log_path)
    assert wait_for(lambda: not process.running, 30)
    assert finished == [] and first_log.is_file()  # ended, not reported yet
    process.start(_sleeper(stop_on_exit=True))
    try:
        assert finished == [3] and not first_log.exists()
        assert Path(process.log_path).is_file() and Path(process.log_path) != first_log
    finally:
        process.stop(wait=True)
    assert finished[-1] != 3 and len(finished) == 2


@pytest.mark.skipif(os.name == "nt", reason="needs a child that ignores SIGTERM")
def test_stop_returns_at_once_and_poll_kills_an_engine_that_ignores_it():
    """Stop must not freeze Slicer while the engine ignores SIGTERM: it returns at once, the timer's poll() kills
    the engine ``wait_s`` later, and the exit (-9) is reported as the user's stop."""
    finished = []
    process = EngineProcess(on_finished=finished.append)
    process.start(_engine_like("ignore"))
    try:
        assert wait_for(lambda: _says_up(process), 30), process.output
        started = time.monotonic()
        process.stop(wait_s=1.0)
        assert time.monotonic() - started < 0.5
        assert process.running and finished == []  # it ignored SIGTERM; nothing is reported yet
        assert wait_for(lambda: process.poll() is not None or finished, 10)
        assert time.monotonic() - started >= 1.0  # killed after the grace time, not before
        assert finished == [-9] and process.finished_message(-9) is None
    finally:
        if process.running:
            process.stop(wait_s=0.1, wait=True)


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell wrapper")
@pytest.mark.parametrize("grandchild", ["exits", "ignores"])
def test_stop_ends_an_engine_behind_a_wrapper_command(grandchild):
    """An engine command like ``sh -c '...'`` or ``conda run ...``: Stop must end the engine the wrapper started, not
    only the wrapper, or it keeps the port (also when the engine ignores SIGTERM)."""
    handler = "signal.SIG_IGN" if grandchild == "ignores" else "signal.SIG_DFL"
    engine = (f"import os, signal, time; signal.signal(signal.SIGTERM, {handler}); "
              "print('engine up', os.getpid(), flush=True); time.sleep(120)")
    script = f"'{sys.executable}' -c \"{engine}\"; echo wrapper done"
    process = EngineProcess()
    process.start(launch_plan(f"/bin/sh -c {shlex.quote(script)}", os.environ, stop_on_exit=True))
    assert wait_for(lambda: _says_up(process), 30), process.output
    pid = int(process.output.split("engine up")[1].split()[0])
    assert pid != process.pid  # the engine runs behind the wrapper
    try:
        process.stop(wait_s=1.0)
        assert wait_for(lambda: process.poll() is not None or not process.running, 10)
        assert wait_for(lambda: not alive(pid), 10), "the engine outlived Stop"
    finally:
        if alive(pid):
            os.kill(pid, 9)


def test_engine_kept_alive_outlives_its_owner():
    """Unchecking "Stop the local engine when Slicer exits": the engine runs in its own session and survives the
    object that started it (a QProcess would kill it when destroyed)."""
    process = EngineProcess()
    process.start(_sleeper(stop_on_exit=False))
    pid = process.pid
    try:
        assert wait_for(lambda: _says_up(process), 30)
        if os.name != "nt":
            assert os.getsid(pid) != os.getsid(0)  # Ctrl+C or a closed terminal of Slicer does not reach it
        process.release()
        process = None
        gc.collect()
        time.sleep(0.3)
        assert alive(pid)
    finally:
        os.kill(pid, 9)


def test_engine_starts_while_host_has_a_foreign_python(monkeypatch):
    """Slicer's launcher sets PYTHONHOME/PYTHONPATH/PYTHONNOUSERSITE for its own Python; the engine (this
    repository's environment) must still start and answer /v1/health."""
    medsight_exe = installed_engine()
    foreign = Path(os.path.expanduser("~/.pyenv/versions/3.9.18"))
    if not foreign.is_dir():
        pytest.skip("no foreign CPython 3.9 to borrow PYTHONHOME from")
    host = dict(os.environ, PYTHONHOME=str(foreign), PYTHONPATH=str(foreign / "lib" / "python3.9"),
                PYTHONNOUSERSITE="1")
    # Inheriting them, as a QProcess with Slicer's environment did, kills the engine's interpreter at start-up.
    import subprocess

    broken = subprocess.run([sys.executable, "-c", "import typing, encodings"], env=host, capture_output=True)
    assert broken.returncode != 0

    port = free_port()
    plan = launch_plan(f'"{medsight_exe}" serve --model tiny --host 127.0.0.1 --port {port}', host, True)
    process = EngineProcess()
    process.start(plan)
    try:
        def healthy() -> bool:
            process.poll()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        assert wait_for(lambda: healthy() or not process.running, 240) and process.running, process.output[-2000:]
    finally:
        process.stop(wait=True)


def test_stop_with_open_asks_ends_the_engine_before_the_kill_timer():
    """`medsight serve` gives open asks a short grace, then cancels them: Stop (SIGTERM) ends the engine by itself
    well before ``stop()``'s kill timer, and the exit is reported as the user's stop, not as a crash."""
    pytest.importorskip("medsight")
    if os.name == "nt":
        pytest.skip("Windows' Stop is TerminateProcess: no graceful shutdown to time")
    import numpy as np

    from MedSIGHTSlicerLib.client import MedSIGHTClient

    medsight_exe = installed_engine()
    port = free_port()
    process = EngineProcess()
    process.start(launch_plan(f'"{medsight_exe}" serve --model tiny --host 127.0.0.1 --port {port}',
                              dict(os.environ), True))
    streams = []
    try:
        client = MedSIGHTClient(f"http://127.0.0.1:{port}", timeout=60, retries=0)

        def healthy() -> bool:
            process.poll()
            try:
                return client.health(timeout=2) is not None
            except Exception:
                return False

        assert wait_for(lambda: healthy() or not process.running, 240) and process.running, process.output[-2000:]
        voxels = (np.arange(8 * 32 * 32).reshape(8, 32, 32) % 97).astype(np.int16)
        volume_id = client.upload_volume(voxels, modality="CT").volume_id
        # Long asks (the tiny model rarely ends early without a repetition penalty): three of them outlast the grace.
        options = {"max_new_tokens": 2048, "repetition_penalty": 1.0, "no_code_fallback": True, "seed": 0}
        for _ in range(3):  # one running, two waiting: without the grace, Stop would wait for all of them
            streams.append(client.ask_stream(volume_id, "Describe the slice.", "axial", range(8), options))
        assert next(iter(streams[0])).kind == "job"
        process.stop()  # the module's Stop: kill timer at 5 s
        codes = []
        assert wait_for(lambda: codes.append(process.poll()) or codes[-1] is not None, 30)
    finally:
        for stream in streams:
            stream.close()
        process.stop(wait=True)
    # Ended by itself, within the grace: by uvicorn's own SIGTERM handling (0, or the signal raised again: -15), not
    # by the kill timer (-9).
    assert codes[-1] in (0, -15), process.output[-2000:]
    assert process.finished_message(codes[-1]) is None  # the user's stop, not a crash
    assert "timeout graceful shutdown exceeded" in process.output  # an ask was open: the grace was used up


def _gate_child(tmp_path: Path, writes: list[bytes], exit_code: int = 0):
    """A child that writes each piece of ``writes`` to stderr, flushed, and waits for a file ``go<n>`` before the
    next one: the test reads (polls) between two writes, as the module's timer would between two reads."""
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys, time\n"
        f"writes = {writes!r}\n"
        "for n, piece in enumerate(writes):\n"
        "    sys.stderr.buffer.write(piece); sys.stderr.flush()\n"
        f"    while not os.path.exists(os.path.join({str(tmp_path)!r}, f'go{{n}}')): time.sleep(0.02)\n"
        f"sys.exit({exit_code})\n"
    )
    return launch_plan(f'"{sys.executable}" "{script}"', os.environ, stop_on_exit=True)


def test_output_is_read_as_terminal_lines_across_reads(tmp_path):
    """Pieces of output the engine writes between two reads: a redrawn progress line ("\\r"), a UTF-8 character and
    an ANSI colour split between two reads, a Windows line end, and a last line without newline. Each redraw used
    to be a line of its own, the split character two replacement characters, the colour codes shown as text."""
    block = "█".encode()
    writes = [b"loading\n\rweights:  10%|" + block[:1], block[1:] + b"|\r\x1b[3", b"2mweights:  50%\x1b[0m|",
              b"\rweights: 100%|" + block + b"|\r\n", b"INFO: up\r\nTraceback: cut sh"]
    lines, partials, finished = [], [], []
    process = EngineProcess(on_output=lines.append, on_partial=partials.append, on_finished=finished.append)
    process.start(_gate_child(tmp_path, writes, exit_code=3))
    for n in range(len(writes)):
        assert wait_for(lambda n=n: (process.poll(), process._read_at)[1] >= sum(map(len, writes[:n + 1])), 30)
        (tmp_path / f"go{n}").touch()
    assert wait_for(lambda: process.poll() is not None or finished, 30)
    shown = output_lines("\n".join(lines))
    assert shown == ["loading", "weights: 100%|█|", "INFO: up", "Traceback: cut sh"]
    assert partials == ["weights:  10%|", "weights:  10%|█|", "weights:  50%|", "", "Traceback: cut sh", ""]
    assert finished == [3] and process.finished_message(3).endswith("INFO: up Traceback: cut sh")
    assert not any("\x1b" in text or "\ufffd" in text for text in lines + partials)


def test_a_line_that_never_ends_is_kept_as_its_start_and_latest_end():
    """An engine printing dots (or a huge repr) with no newline: the unfinished line grew without bound, and every
    read re-scanned it and the log redrew all of it. It is kept as its start (where an error names itself) and its
    latest end, also once its newline comes, and a redraw ("\\r") still replaces it."""
    reads = 50
    lines = OutputLines()
    assert lines.feed(b"RuntimeError: loading") == []
    for _ in range(reads):
        assert lines.feed(b"." * LINE_CHARS) == []
        assert len(lines.partial) <= LINE_CHARS and lines.partial.startswith("RuntimeError: loading")
    assert lines.feed(b"done") == [] and lines.partial.endswith("." * 10 + "done")
    [line] = lines.feed(b"\nnext")
    assert len(line) <= LINE_CHARS and line.startswith("RuntimeError: loading") and line.endswith("...done")
    assert lines.partial == "next"
    lines.feed(b"." * LINE_CHARS * reads + b"\rredrawn 50%")
    assert lines.partial == "redrawn 50%"
    redrawn, long = lines.feed(b"\n" + b"x" * LINE_CHARS * reads + b"y\n")  # a whole long line in one read
    assert redrawn == "redrawn 50%" and len(long) <= LINE_CHARS and long.startswith("xxx") and long.endswith("xy")


def test_released_engine_leaves_no_log_file():
    """An engine kept running after Slicer exits ("stop on exit" off): no later session reads its log file, which
    stayed in the temp folder forever, growing. Release removes it; the engine keeps running (and writing)."""
    process = EngineProcess()
    process.start(_sleeper(stop_on_exit=False))
    pid, log = process.pid, Path(process.log_path)
    try:
        assert wait_for(lambda: _says_up(process), 30)
        process.release()
        if os.name != "nt":  # Windows refuses to remove a file another process holds open
            assert not log.exists()
        assert alive(pid)
    finally:
        os.kill(pid, 9)


@pytest.mark.parametrize("reloading", [False, True])
def test_leaving_an_engine_that_ended_unreported_removes_its_log(reloading):
    """The engine crashed just before Slicer exits (or a Reload), before the timer's next poll: its exit is reported
    and its log file removed (it stayed in the temp folder). Its listeners (the settings page) hear of it on a Reload;
    at exit they are dropped first, told of nothing more."""
    finished, told = [], []
    process = EngineProcess(on_finished=finished.append)
    process.add_listener(lambda: told.append(process.running))
    process.add_listener(told.append)  # another listener
    process.remove_listener(told.append)
    process.start(launch_plan(f'"{sys.executable}" -c "import sys; sys.exit(3)"', os.environ, stop_on_exit=True))
    assert len(told) == 1  # the start (the engine may have ended by then), the removed listener not told
    log = Path(process.log_path)
    assert wait_for(lambda: not process.running, 30)
    assert leave_engine(process, stop_on_exit=True, reloading=reloading) is None
    assert finished == [3] and not log.exists()
    assert told[1:] == ([False] if reloading else [])


@pytest.mark.parametrize("stop_on_exit", [True, False])
def test_a_reload_hands_the_running_engine_on_and_only_exit_ends_it(stop_on_exit):
    """Slicer calls the widget's cleanup() for a developer Reload too (reloadScriptedModule, before the new widget's
    setup()): an engine set to stop on exit was stopped by a Reload. A reload hands it on, running, to the new
    widget's callbacks; at exit it is stopped (stop on exit) or released, still running."""
    old_lines, old_finished, new_finished = [], [], []
    process = EngineProcess(on_output=old_lines.append, on_finished=old_finished.append)
    process.start(_sleeper(stop_on_exit=stop_on_exit))
    pid = process.pid
    try:
        assert wait_for(lambda: _says_up(process), 30), process.output
        handed = leave_engine(process, stop_on_exit, reloading=True)
        assert handed is process and process.running and alive(pid)
        handed.rebind(on_finished=new_finished.append)  # the reloaded widget's
        assert leave_engine(handed, stop_on_exit, reloading=False) is None  # Slicer exits
        assert not handed.running and alive(pid) != stop_on_exit
        assert old_finished == [] and len(new_finished) == int(stop_on_exit)
        assert len(old_lines) == 1  # "engine up", before the reload
    finally:
        if alive(pid):
            os.kill(pid, 9)
