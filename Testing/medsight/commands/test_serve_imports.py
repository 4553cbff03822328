"""What a running `medsight serve` has imported: not scikit-learn, which transformers imported with every model
class (about 700 modules with pandas and scipy's, 1.3 s of CPU at each start) for a feature the engine never uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medsight_testing.child_engine import checkout_env, imported_modules
from medsight_testing.processes import free_port
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError


@pytest.mark.skipif(os.name == "nt", reason="SIGINT: POSIX")
def test_serve_answers_without_importing_sklearn(tmp_path):
    """Before the fix `sklearn`, `sklearn.metrics` and pandas were among the serving engine's modules."""
    port = free_port()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "medsight.cli", "serve", "--model",
                                    "tiny", "--port", str(port)], stderr=stderr, env=checkout_env(HF_HUB_OFFLINE="1"))
    try:
        client = MedSIGHTClient(f"http://127.0.0.1:{port}", timeout=60, retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.health()
                break
            except MedSIGHTError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
        reply = client.ask(client.upload_volume(volume).volume_id, "Where is the liver?", indices=[1],
                           options={"max_new_tokens": 4})
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert len(reply.answers) == 1
    imported = imported_modules(log.read_text())
    # The path that brought sklearn in ran: the model's generation code and the transformers module importing it.
    assert {"medsight.engine", "transformers.generation.candidate_generator"} <= imported
    assert not {name for name in imported if name.split(".")[0] in ("sklearn", "pandas")}
