"""Plain vs streamed asks of the same work through a real uvicorn server (not a test).

Usage: python benchmarks/plain_vs_stream.py [--model tiny] [--slices 4] [--tokens 64] [--repeats 3] [--threads N]

Both kinds run on the engine's one worker thread with the compute threads set once (`medsight serve --threads`,
default: 1 for small models, else the usable cores), so they should cost the same; before the job queue, plain
asks ran on the web framework's thread pool and were 5-20x slower on 2 cores. Alternates plain and streamed
asks (greedy, the same slices and token count) and prints the median wall time of each as the client sees it, the
engine's own time, and the ratio; the target is within 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import medsight
from medsight.model.sizes import model_size
from medsight.server.app import create_app
from medsight.server.jobs import default_compute_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "support"))
from medsight_testing.arrays import npy  # the test helpers are not an installed package
from medsight_testing.live_server import live_server


def plain(c: httpx.Client, body: dict) -> tuple[float, float, int]:
    start = time.perf_counter()
    r = c.post("/v1/ask", json=body)
    r.raise_for_status()
    done = r.json()
    return time.perf_counter() - start, done["timings"]["total"], sum(len(a["text"]) for a in done["answers"])


def streamed(c: httpx.Client, body: dict) -> tuple[float, float, int]:
    start = time.perf_counter()
    done = None
    with c.stream("POST", "/v1/ask", json={**body, "stream": True}) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
    return time.perf_counter() - start, done["timings"]["total"], sum(len(a["text"]) for a in done["answers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="default: what `medsight serve` picks for the model")
    args = parser.parse_args()

    engine = medsight.Engine.load(args.model, device="cpu")
    args.threads = args.threads or default_compute_threads(model_size(engine.model.config).total, "cpu")
    app = create_app(engine, model_name=args.model, compute_threads=args.threads)
    volume = np.random.default_rng(0).integers(0, 255, (args.slices, 96, 96)).astype(np.uint8)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"model {args.model}, {args.slices} slices x {args.tokens} tokens, compute threads {args.threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with live_server(app) as url, httpx.Client(base_url=url, timeout=3600) as c:
        vid = c.post("/v1/volumes", content=npy(volume), headers={"content-type": "application/octet-stream"}).json()
        body = {"volume_id": vid["volume_id"], "slices": {"indices": list(range(args.slices))},
                "messages": [{"role": "user", "content": "Please segment the white matter."}],
                "options": {"max_new_tokens": args.tokens, "repetition_penalty": 1.0}}
        plain(c, body)  # warm-up: the feature cache then serves both kinds alike
        runs: dict[str, list[tuple[float, float, int]]] = {"plain": [], "streamed": []}
        for _ in range(args.repeats):
            runs["plain"].append(plain(c, body))
            runs["streamed"].append(streamed(c, body))
    medians = {}
    for kind, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        engine_s = statistics.median(v[1] for v in values)
        medians[kind] = wall
        print(f"{kind:9s} wall {wall:.3f} s (engine {engine_s:.3f} s), answer chars {values[0][2]}")
    ratio = medians["plain"] / medians["streamed"]
    print(f"plain / streamed wall time: {ratio:.2f} ({'within' if abs(ratio - 1) <= 0.2 else 'NOT within'} 20 %)")


if __name__ == "__main__":
    main()
