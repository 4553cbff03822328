"""Slices per second: one batched ask vs one ask per slice, on the same engine and volume (not a test).

Usage: python benchmarks/engine_throughput.py [--model tiny] [--slices 32] [--tokens 16] [--device cpu]
Prints the machine, versions, both rates and their ratio. The feature cache is cleared before each run so both
paths encode every slice.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import medsight
from medsight.engine import VolumeSlices


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from official_style import mni_volume  # one MNI152 volume for every benchmark

    engine = medsight.Engine.load(args.model, device=args.device)
    volume = mni_volume()
    first = (volume.array.shape[0] - args.slices) // 2
    indices = list(range(first, first + args.slices))
    options = medsight.GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    question = "Please segment the white matter."
    engine.ask(VolumeSlices(volume, "axial", indices[:2]), question, options)  # warm-up

    engine.clear_cache()
    one_by_one = timed(lambda: [engine.ask(VolumeSlices(volume, "axial", [i]), question, options) for i in indices])
    engine.clear_cache()
    batched = timed(lambda: engine.ask(VolumeSlices(volume, "axial", indices), question, options))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, dtype {engine.model.dtype}, model {args.model}")
    print(f"{args.slices} axial slices of MNI152, {args.tokens} new tokens each")
    print(f"one by one: {args.slices / one_by_one:8.2f} slices/s ({one_by_one:.2f} s)")
    print(f"batched:    {args.slices / batched:8.2f} slices/s ({batched:.2f} s)")
    print(f"ratio (batched / one by one): {one_by_one / batched:.2f}x")


if __name__ == "__main__":
    main()
