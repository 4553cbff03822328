"""Run a command under `torchrun` on this machine's CPU (gloo), as the training and evaluation tests need."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def torchrun_command(world: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `torchrun --nproc-per-node WORLD ARGS` in a child that imports what this
    test imports (one thread per rank). ARGS: a script and its arguments, or ``-m`` and a module's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as free:  # torchrun's static rendezvous needs a concrete port
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(port), *args]
    return command, env


def torchrun(world: int, args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """Run `torchrun_command`; the test fails, showing each rank's error line first, unless every rank succeeds."""
    command, env = torchrun_command(world, args)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    # The tail of stderr is often rank 0's traceback about a peer that had crashed: each rank's own error comes first.
    errors = "\n".join(line for line in done.stderr.splitlines() if "Error" in line and "[rank" in line)
    assert done.returncode == 0, errors[-3000:] + "\n" + done.stdout[-2000:] + done.stderr[-4000:]
    return done


def interrupt_torchrun(world: int, args: list[str], started: bytes | tuple[bytes, ...]) -> str:
    """Start `torchrun_command`, wait until its stderr holds every ``started`` marker (the ranks are at work), then
    press Ctrl+C as a terminal does (SIGINT to torchrun and every rank); return all it wrote to stderr."""
    import signal

    markers = (started,) if isinstance(started, bytes) else started
    command, env = torchrun_command(world, args)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    while not all(marker in seen for marker in markers):
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")  # it ended before it was at work
        seen += chunk
    os.killpg(process.pid, signal.SIGINT)
    err = (seen + process.stderr.read()).decode(errors="replace")
    process.wait(timeout=120)
    return err
