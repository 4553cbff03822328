"""Encode / decode throughput: onnxruntime (CPU provider) vs PyTorch (CPU), same weights, same process (not a test).

Usage: python benchmarks/onnx_vs_torch.py [--models tiny demo] [--batch 16] [--codes 2] [--repeats 5] [--threads N]
                                         [--perceiver-attention sdpa|eager]
Exports each model to a temporary folder, checks parity, then times alternating runs and prints the best of each.
Both sides get the same compute threads (default: torch's count); onnxruntime's own default would be one per core.
PyTorch's perceiver runs the Engine's default kernel (sdpa) unless told otherwise; the graphs are traced from eager.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

from medsight.model.loading import load_model
from medsight.model.perceiver import ATTENTION_IMPLEMENTATIONS
from medsight.onnx_backend import OnnxVisionBackend
from medsight.onnx_export import export_onnx


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Alternate the candidates `repeats` times (so load changes hit both) and keep each one's best time."""
    times = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--codes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="compute threads of both sides (default: torch's count)")
    parser.add_argument("--perceiver-attention", choices=ATTENTION_IMPLEMENTATIONS, default="sdpa",
                        help="PyTorch's perceiver kernel (default: the Engine's, sdpa)")
    args = parser.parse_args()
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; batch {args.batch}, K = {args.codes}")
    for name in args.models:
        bench_model(name, args)


def bench_model(name: str, args: argparse.Namespace) -> None:
    """Export one preset, check parity and print its encode and decode rows."""
    model = load_model(name, device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, folder, exporter="torchscript" if name == "tiny" else "auto")
        model.region_perceiver.attention_implementation = args.perceiver_attention
        ort = OnnxVisionBackend(folder, providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
        ort_threads = ort.sessions["vision_encoder"].get_session_options().intra_op_num_threads
        print(f"threads: torch {torch.get_num_threads()}, onnxruntime {ort_threads or 'one per core'}; "
              f"torch perceiver attention: {args.perceiver_attention}")
        print(f"{'model':6s} {'stage':7s} {'torch ms':>10s} {'ort ms':>10s} {'ort/torch speed':>16s} "
              f"{'max|diff|':>10s}")
        size, dim = model.config.vision.image_size, model.config.perceiver.dim
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(args.batch, 3, size, size, generator=gen)
        grid = model.encode(pixels).grid
        codes = torch.randn(args.batch, args.codes, dim, generator=gen)
        mask = torch.ones(args.batch, args.codes, dtype=torch.bool)

        def torch_decode() -> torch.Tensor:
            with torch.inference_mode():
                return model.region_perceiver.decode(grid, codes, mask)[0]

        diffs = {
            "encode": (ort.encode(pixels).region_tokens - model.encode(pixels).region_tokens).abs().max().item(),
            "decode": (ort.decode(grid, codes, mask)[0] - torch_decode()).abs().max().item(),
        }
        stages = {
            "encode": {"torch": lambda: model.encode(pixels), "ort": lambda: ort.encode(pixels)},
            "decode": {"torch": torch_decode, "ort": lambda: ort.decode(grid, codes, mask)},
        }
        for stage, fns in stages.items():
            t = best_of(fns, args.repeats)
            print(f"{name:6s} {stage:7s} {1000 * t['torch']:10.1f} {1000 * t['ort']:10.1f} "
                  f"{t['torch'] / t['ort']:15.2f}x {diffs[stage]:10.2e}")

if __name__ == "__main__":
    main()
