"""How long `medsight serve` takes to start and to stop, this checkout's engine beside an older revision's (not a test).

Usage: python benchmarks/serve_start_stop.py [--old REV] [--model tiny] [--rounds 3]

REV (default dc89f44, before scikit-learn was left out of the engine's process) is exported with `git archive` into
a temporary folder; both engines run on this environment's packages, alternately, on the CPU. Each round starts
each engine three times, with --exit-with-parent, and stops it in the three ways it is stopped: SIGINT (Ctrl+C),
SIGTERM (the 3D Slicer module's Stop) and its standard input closed (Slicer ending, seen by the parent watch),
each after one ask. Prints the medians, old beside new: seconds from the start until /v1/health answers, the CPU
seconds the engine had used by then (Linux; where CPUs are shared the wall time is noisy), whether scikit-learn
was loaded (Linux: its libraries in the process's memory map), seconds from the stop until the process ended, and
its exit status (-6: SIGABRT, Python's "could not acquire lock for <stdin>" abort; -15: SIGTERM, re-raised by uvicorn
once it has stopped).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing" / "support"), str(ROOT / "MedSIGHTSlicer")]  # not installed packages
from medsight_testing.processes import free_port  # noqa: E402
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError  # noqa: E402

STOPS = ("SIGINT", "SIGTERM", "stdin")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a live process (/proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sklearn_loaded(pid: int) -> str:
    try:
        return "yes" if "/sklearn/" in Path(f"/proc/{pid}/maps").read_text() else "no"
    except OSError:
        return "?"


def run_once(engine: Path, model: str, stop: str) -> dict[str, object]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(engine)}
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--model", model, "--device", "cpu",
                                "--port", str(port), "--exit-with-parent", "--log-level", "warning"],
                               stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    client = MedSIGHTClient(f"http://127.0.0.1:{port}", timeout=120, retries=0)
    while True:
        try:
            client.health()
            break
        except MedSIGHTError:
            if process.poll() is not None:
                raise SystemExit(f"the engine in {engine} exited with {process.returncode}") from None
            time.sleep(0.02)
    result: dict[str, object] = {"ready": time.monotonic() - start, "cpu": cpu_seconds(process.pid),
                                 "sklearn": sklearn_loaded(process.pid)}
    volume = np.random.default_rng(0).integers(-200, 200, (3, 16, 16)).astype(np.int16)
    client.ask(client.upload_volume(volume).volume_id, "Where is the liver?", indices=[1],
               options={"max_new_tokens": 4})
    stopped = time.monotonic()
    if stop == "stdin":
        process.stdin.close()
    else:
        process.send_signal(getattr(signal, stop))
    process.wait(timeout=120)
    result["exit"] = time.monotonic() - stopped
    result["status"] = process.returncode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="dc89f44", help="git revision to compare with (default %(default)s)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "old.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), args.old, "engine"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        engines = {"old": Path(folder) / "engine", "new": ROOT / "engine"}
        runs: dict[str, list[dict[str, object]]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for stop in STOPS:
                for name, engine in engines.items():
                    runs[name].append({"stop": stop, **run_once(engine, args.model, stop)})
    print(f"medsight serve --model {args.model}, {args.rounds} rounds; old = {args.old}, new = this checkout; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    def median(name: str, key: str, stop: str | None = None) -> float:
        return statistics.median(r[key] for r in runs[name] if stop is None or r["stop"] == stop)

    print(f"{'':34}{'old':>8}{'new':>8}")
    print(f"{'start to /v1/health (s)':34}{median('old', 'ready'):8.2f}{median('new', 'ready'):8.2f}")
    print(f"{'CPU used by then (s)':34}{median('old', 'cpu'):8.2f}{median('new', 'cpu'):8.2f}")
    print(f"{'scikit-learn loaded':34}{runs['old'][0]['sklearn']:>8}{runs['new'][0]['sklearn']:>8}")
    for stop in STOPS:
        label = f"{stop} to exit (s)" if stop != "stdin" else "stdin closed to exit (s)"
        print(f"{label:34}{median('old', 'exit', stop):8.2f}{median('new', 'exit', stop):8.2f}")
        statuses = {name: ",".join(sorted({str(r["status"]) for r in runs[name] if r["stop"] == stop}))
                    for name in runs}
        print(f"{'  its exit status':34}{statuses['old']:>8}{statuses['new']:>8}")


if __name__ == "__main__":
    main()
