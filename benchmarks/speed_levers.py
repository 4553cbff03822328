"""The engine's speed levers, each measured side by side in one process on identical weights (not a test).

Usage: python benchmarks/speed_levers.py [--presets demo full-perceiver engine kv-cache] [--slices 16] [--repeats 3]
       [--compile]

Levers (each against the same baseline, best of alternating repeats, with the largest difference from it):

* encode shortcut (`RegionPerceiver.region_tokens`): the region tokens without the last stage's image path and the
  final mask head, which only feed masks (exact);
* shared grid features (`RegionPerceiver.grid_features`): the grid + PE and stage 0's convolution, which do not
  depend on the queries, computed once per slice by the encode pass and reused by the decode pass (exact);
* position encoding cache: the perceiver's sine encodings computed once per size instead of on every call;
* SDPA: torch's fused attention in the perceiver's cross-attentions instead of the official eager arithmetic;
* bf16: the whole model in bfloat16 (on CPU; on GPUs this is the default way to run the 8B model);
* `torch.compile` of the perceiver (`--compile`, inductor, shapes fixed; its compile time is printed);
* ONNX Runtime: benchmarks/onnx_vs_torch.py (batch 16);
* batching and the feature cache: measured by benchmarks/engine_throughput.py and official_style.py.

"full-perceiver" decodes with the full-size Region Perceiver (1024-d, 24x24 grid -> 192x192 masks, random
weights): the shapes where the attention kernels matter.

"kv-cache" (opt-in, ~40 s of compilation): the demo language model's greedy decoding with HF `generate`, dynamic
KV cache (what the engine uses) vs static cache vs static cache + `torch.compile`, same tokens required.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import numpy as np
import torch

import medsight.model.perceiver as perceiver_module
from medsight.config import get_preset
from medsight.model.generation import GenerationOptions
from medsight.model.perceiver import RegionPerceiver


def best_of(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Alternating timings (best of ``repeats``) and each candidate's max |difference| from the first one."""
    times = {k: float("inf") for k in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            with torch.inference_mode():
                outputs[name] = fn()
            times[name] = min(times[name], time.perf_counter() - start)
    base = next(iter(outputs.values())).float()
    diffs = {k: float((v.float() - base).abs().max()) for k, v in outputs.items()}
    return times, diffs


class NoPositionCache:
    """Within the block, the perceiver recomputes its sine encodings on every call (the official behaviour)."""

    def __init__(self, perceiver: RegionPerceiver) -> None:
        self.perceiver = perceiver

    def __enter__(self):
        dim = self.perceiver.cfg.dim

        def recompute(height: int, width: int, device: torch.device) -> torch.Tensor:
            return perceiver_module.sine_position_encoding(height, width, dim, device)

        self.perceiver.position_encoding = recompute
        return self

    def __exit__(self, *exc):
        del self.perceiver.position_encoding  # the class's cached method again


def perceiver_levers(name: str, perceiver: RegionPerceiver, grid: torch.Tensor, codes: torch.Tensor,
                     repeats: int, compile_: bool = False) -> None:
    # bf16 runs on its own copy: a float32 -> bf16 -> float32 round trip would round the other rows' weights.
    copies = {torch.float32: perceiver, torch.bfloat16: copy.deepcopy(perceiver).to(torch.bfloat16)}

    def run(impl: str, cache: bool = True, dtype: torch.dtype = torch.float32, shared: bool = False,
            decode=None) -> Callable[[], torch.Tensor]:
        model, g, c = copies[dtype], grid.to(dtype), codes.to(dtype)
        with torch.inference_mode():
            kept = model.grid_features(g) if shared else None  # computed by the encode pass, not timed here

        def fn() -> torch.Tensor:
            model.attention_implementation = impl
            if decode is not None:
                return decode(g, c)[0]
            if cache:
                return model.decode(g, c, grid_features=kept)[0]
            with NoPositionCache(model):
                return model.decode(g, c)[0]
        return fn

    batch, k = codes.shape[:2]
    perceiver.attention_implementation = "sdpa"
    with torch.inference_mode():
        encode = {"full forward (before)": lambda: perceiver(grid).queries,
                  "region_tokens": lambda: perceiver.region_tokens(grid)}
        times, diffs = best_of(encode, repeats)
    base = next(iter(times.values()))
    print(f"\n{name}: perceiver encode (sdpa), batch {batch}, grid {tuple(grid.shape[1:3])}")
    for label, t in times.items():
        print(f"  {label:34s} {1000 * t:9.1f} ms  {base / t:5.2f}x  max|diff| {diffs[label]:.2e}")

    fns = {"eager, PE recomputed (official)": run("eager", cache=False), "eager + PE cache": run("eager"),
           "sdpa + PE cache (before)": run("sdpa"), "sdpa + shared grid features": run("sdpa", shared=True),
           "sdpa + PE cache, bf16": run("sdpa", dtype=torch.bfloat16)}
    if compile_:
        perceiver.attention_implementation = "sdpa"
        compiled = torch.compile(perceiver.decode, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(grid, codes)
        print(f"\n  (torch.compile: first call {time.perf_counter() - start:.0f} s)")
        fns["sdpa, torch.compile"] = run("sdpa", decode=compiled)
    times, diffs = best_of(fns, repeats)
    with torch.inference_mode():
        before = fns["sdpa + PE cache (before)"]()
        against_before = {k: float((fns[k]().float() - before).abs().max()) for k in fns if "sdpa" in k}
    perceiver.attention_implementation = "eager"
    base = times["sdpa + PE cache (before)"]
    print(f"\n{name}: perceiver decode, batch {batch} x {k} codes, grid {tuple(grid.shape[1:3])} (speed vs 'before', "
          f"diff vs the official row)")
    for label, t in times.items():
        print(f"  {label:34s} {1000 * t:9.1f} ms  {base / t:5.2f}x  max|diff| {diffs[label]:.2e}")
    print("  max|diff| from 'before': " + ", ".join(f"{k} {v:.2e}" for k, v in against_before.items()))


def engine_levers(slices: int, repeats: int) -> None:
    """Whole `Engine.ask` on MNI152 slices with the demo model: float32 vs bfloat16, eager vs SDPA."""
    from official_style import mni_volume

    import medsight
    from medsight.engine import VolumeSlices

    volume = mni_volume()
    voxels = volume.array
    indices = list(np.linspace(20, voxels.shape[0] - 20, slices).astype(int))
    options = GenerationOptions(max_new_tokens=32)
    engines = {"float32, eager": medsight.Engine.load("demo", device="cpu"),
               "float32, sdpa": medsight.Engine.load("demo", device="cpu"),
               "bfloat16, sdpa": medsight.Engine.load("demo", device="cpu", dtype=torch.bfloat16)}
    engines["float32, sdpa"].model.region_perceiver.attention_implementation = "sdpa"
    engines["bfloat16, sdpa"].model.region_perceiver.attention_implementation = "sdpa"

    def run(engine) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            engine.clear_cache()  # every repeat encodes again: the lever must not hide behind the feature cache
            answer = engine.ask(VolumeSlices(volume, "axial", indices), "Please segment the white matter.", options)
            masks = [r.mask_logits.float() for s in answer.answers for r in s.regions]
            return torch.stack(masks) if masks else torch.zeros(1)
        return fn

    times, diffs = best_of({k: run(e) for k, e in engines.items()}, repeats)
    base = next(iter(times.values()))
    print(f"\ndemo model, Engine.ask on {slices} MNI152 slices (32 new tokens, encode + generate + decode)")
    for label, t in times.items():
        print(f"  {label:34s} {1000 * t / slices:9.1f} ms/slice  {base / t:5.2f}x  max|diff| {diffs[label]:.2e}")


def kv_cache_levers(repeats: int, prompt: int = 300, new_tokens: int = 32) -> None:
    """Greedy decoding of the demo LM: dynamic vs static KV cache, then static + torch.compile (batch 1)."""
    from medsight.model.loading import load_model

    lm = load_model("demo", device="cpu").language_model.eval()
    embeds = torch.randn(1, prompt, lm.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.3

    def run(**kwargs) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            return lm.generate(inputs_embeds=embeds, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, **kwargs)
        return fn

    fns = {"dynamic cache (engine)": run(), "static cache": run(cache_implementation="static")}
    times, _ = best_of(fns, repeats)
    with torch.inference_mode():
        outputs = {k: fn() for k, fn in fns.items()}
    lm.forward = torch.compile(lm.forward, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        outputs["static + torch.compile"] = run(cache_implementation="static")()
    compile_s = time.perf_counter() - start
    times.update(best_of({"static + torch.compile": run(cache_implementation="static")}, repeats)[0])
    base = times["dynamic cache (engine)"]
    same = all(torch.equal(o, outputs["dynamic cache (engine)"]) for o in outputs.values())
    print(f"\ndemo LM greedy decoding, batch 1, {prompt} prompt embeddings, {new_tokens} new tokens "
          f"(same tokens: {same}; first compiled call {compile_s:.0f} s)")
    for label, t in times.items():
        print(f"  {label:34s} {1000 * t:9.1f} ms  {base / t:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo", "full-perceiver", "engine"])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--codes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the perceiver decode")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    for preset in args.presets:
        if preset == "engine":
            engine_levers(args.slices, args.repeats)
            continue
        if preset == "kv-cache":
            kv_cache_levers(args.repeats)
            continue
        cfg = get_preset("full" if preset == "full-perceiver" else preset)
        perceiver = RegionPerceiver(cfg.perceiver).eval()
        side = cfg.vision.grid_size
        batch = 1 if preset == "full-perceiver" else args.slices
        grid = torch.randn(batch, side, side, cfg.perceiver.dim)
        codes = torch.randn(batch, args.codes, cfg.perceiver.dim)
        perceiver_levers(preset, perceiver, grid, codes, args.repeats, args.compile)


if __name__ == "__main__":
    main()
