"""`medsight serve` on a port that is already taken (another program, or an engine kept running from an earlier
Slicer session) fails before it loads the model, with a message naming the port, instead of after it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from medsight.commands.serve import check_port
from medsight_testing.live_server import free_port

#: What loading the tiny preset prints (medsight.model.loading): absent when serve stopped before the model loaded.
MODEL_LOADED = "preset 'tiny': random weights"


def _listening(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_a_taken_port_is_refused_before_the_model_loads():
    with _listening() as taken:
        port = taken.getsockname()[1]
        served = subprocess.run([sys.executable, "-m", "medsight.cli", "serve", "--model", "tiny", "--port",
                                 str(port)], capture_output=True, text=True, timeout=600)
    assert served.returncode == 2, served.stderr
    assert MODEL_LOADED not in served.stderr
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medsight: error: cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in last.lower() and "--port" in last


def test_check_port_accepts_a_free_port_and_names_a_taken_one():
    port = free_port()
    check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # the check itself leaves the port free
    with _listening() as taken:
        taken_port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{taken_port}: .*another --port"):
            check_port("127.0.0.1", taken_port)
