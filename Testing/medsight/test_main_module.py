"""`python -m medsight` runs the same command line as the `medsight` console script."""

import os
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-W", "default", "-m", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_python_m_medsight_is_the_medsight_command():
    out = run("medsight", "info", "--preset", "tiny")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("preset tiny: vision ") and "parameters" in out.stdout
    assert "RuntimeWarning" not in out.stderr, out.stderr
    # Its errors are the command's: a usage error exits 2 naming the program.
    wrong = run("medsight", "no-such-command")
    assert wrong.returncode == 2 and "usage: medsight" in wrong.stderr
