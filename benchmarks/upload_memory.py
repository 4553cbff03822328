"""Memory and time of sending one volume from a Slicer volume node to the engine (not a test).

Usage: python benchmarks/upload_memory.py [--shape 1000x512x512] [--dtype int16] [--model tiny]

The Slicer side (``geometry.volume_upload_arrays`` on a slicer-core node, then ``MedSIGHTClient.upload_volume``)
runs here; the engine runs in a child process behind a real uvicorn server, so each side's tracemalloc peak
(numpy reports its buffers to it; VTK's own buffer, the node's voxels, is not counted) is its own. Prints both
peaks in volumes (multiples of the voxels' bytes) beside the volume already in the node: the target is one on each
side, the snapshot the Slicer side sends (the worker thread reads it while the user goes on working) and the
volume the engine keeps.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "support"))  # the test helpers are not an installed package
sys.path.insert(0, str(REPO / "MedSIGHTSlicer"))


def serve(port: int, model: str) -> None:
    """The engine, with two routes of this benchmark's own: reset the peak before an upload, read it after."""
    import medsight
    from medsight.server.app import create_app
    from medsight_testing.live_server import live_server

    app = create_app(medsight.Engine.load(model, device="cpu"))
    base = [0]

    @app.get("/bench/reset")
    def reset() -> dict:
        gc.collect()
        tracemalloc.start()  # only now: tracing the imports and the model's load would take minutes
        tracemalloc.reset_peak()
        base[0] = tracemalloc.get_traced_memory()[0]
        return {}

    @app.get("/bench/peak")
    def peak() -> dict:
        current, top = tracemalloc.get_traced_memory()
        return {"peak": top - base[0], "held": current - base[0]}

    with live_server(app, port=port):
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes the pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1000x512x512", help="k x j x i voxels")
    parser.add_argument("--dtype", default="int16")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model)
        return

    import slicer

    from medsight_testing.live_server import free_port
    from medsight_testing.mrml import make_volume, oblique_matrix
    from MedSIGHTSlicerLib.client import MedSIGHTClient
    from MedSIGHTSlicerLib.geometry import volume_upload_arrays

    shape = tuple(int(n) for n in args.shape.lower().split("x"))
    port = free_port()
    engine = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model", args.model],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if engine.stdout.readline().strip() != "ready":
            raise SystemExit("the engine did not start")
        url = f"http://127.0.0.1:{port}"
        scene = slicer.vtkMRMLScene()
        voxels = np.random.default_rng(0).integers(-1000, 2000, size=shape, dtype=np.int16)
        voxels = voxels.astype(args.dtype, copy=False)
        node = make_volume(scene, voxels, oblique_matrix(), dtype=voxels.dtype)
        size = voxels.nbytes
        del voxels
        gc.collect()
        client = MedSIGHTClient(url, timeout=3600)
        client.health()  # the upload limits, fetched before measuring
        urllib.request.urlopen(f"{url}/bench/reset").read()
        tracemalloc.start()
        start = time.perf_counter()
        info = client.upload_volume(*volume_upload_arrays(node), modality="CT")
        seconds = time.perf_counter() - start
        slicer_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        engine_side = json.loads(urllib.request.urlopen(f"{url}/bench/peak").read())
    finally:
        engine.stdin.close()
        engine.wait(timeout=60)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"volume {' x '.join(map(str, shape))} {args.dtype}: {size / 2**20:.0f} MiB, id {info.volume_id[:12]}")
    print(f"Slicer side peak: {slicer_peak / size:.2f} volumes beside the node's")
    print(f"engine side peak: {engine_side['peak'] / size:.2f} volumes, kept {engine_side['held'] / size:.2f}")
    print(f"upload time: {seconds:.2f} s ({size / 2**20 / seconds:.0f} MiB/s)")


if __name__ == "__main__":
    main()
