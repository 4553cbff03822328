"""Full-size MedSIGHT with random weights: one-slice latency, volume throughput and peak memory vs the budget.

One command, sized for a 10-minute GPU session (model built directly on the device in bf16, no checkpoint download,
about 1-2 minutes of work on an H100; `--time-limit` stops the volume pass early and reports what it measured). The
full preset has no tokenizer, so prompts are built from ids directly (14 text ids, the <image> slot, 12 text ids),
and a logits processor forces one region code per answer so that a mask is always decoded.

Batch sizes default to "auto": the largest that the memory budget leaves room for next to the weights (the KV cache
per answer, the perceiver's activations per slice at the mask resolution; estimates printed), so that the run tests
the latency, throughput and memory targets together. Progress lines are flushed as they happen.

Usage:
    python benchmarks/gpu_fullsize.py                       # full model on CUDA, bf16 (the GPU run)
    python benchmarks/gpu_fullsize.py --tiny --device cpu   # tiny config on the CPU: proves the script works
    python benchmarks/gpu_fullsize.py --perceiver-attention eager   # the official attention arithmetic
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LogitsProcessor

from medsight.config import full_config, tiny_config
from medsight.model.generation import GenerationOptions
from medsight.model.lvlm import IMAGE_TOKEN_INDEX
from medsight.model.medsight import ImageEncoding, MedSIGHTModel
from medsight.model.perceiver import GridFeatures

BUDGET_LATENCY_S = 0.30
BUDGET_SLICES_PER_S = 25.0
BUDGET_MEMORY_GB = 18.5


class ForceCode(LogitsProcessor):
    """Exactly one region code per answer: `code_id` at generation step `step`, no code at any other step."""

    def __init__(self, code_id: int, step: int, first_code_id: int) -> None:
        self.code_id, self.step, self.first_code_id = code_id, step, first_code_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.step:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.code_id] = 0.0
            return forced
        scores[:, self.first_code_id :] = float("-inf")
        return scores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config, device: torch.device, dtype: torch.dtype) -> MedSIGHTModel:
    """Random weights created directly on the device in `dtype` (no float32 copy of the full model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MedSIGHTModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def answer(model: MedSIGHTModel, pixels: torch.Tensor, prompt: list[int], options: GenerationOptions,
           encode_batch: int, decode_batch: int) -> list[torch.Tensor]:
    """What `Engine.ask` does on the model: encode (chunked; the perceiver's grid features kept for decode),
    generate all rows as one batch, decode every row's codes (chunked); returns mask logits."""
    chunks = [model.encode(pixels[i : i + encode_batch], keep_grid_features=True)
              for i in range(0, pixels.shape[0], encode_batch)]
    enc = ImageEncoding(*(torch.cat([getattr(c, f) for c in chunks]) for f in ("cls", "patches", "grid",
                                                                                 "region_tokens")))
    shared = GridFeatures.cat([c.grid_features for c in chunks])
    encodings = [enc.select(i) for i in range(pixels.shape[0])]
    output = model.generate([prompt] * len(encodings), encodings, options)
    states = [model.code_states(output, row, options)[1] for row in range(len(encodings))]
    masks: list[torch.Tensor] = []
    for i in range(0, len(states), decode_batch):
        rows = slice(i, i + decode_batch)
        masks.extend(model.decode_regions(enc.grid[rows], states[rows], grid_features=shared[rows]))
    return masks


def auto_batches(model: MedSIGHTModel, prompt_length: int, tokens: int, budget_bytes: float) -> dict[str, int]:
    """Batch sizes that fit the memory budget next to the weights (rough upper estimates, printed)."""
    cfg, size = model.config, model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    headroom = max(budget_bytes - weights - 0.4e9, 0.0)  # 0.4 GB for the allocator's fragmentation and workspaces
    llm = cfg.llm
    sequence = prompt_length + cfg.vision.num_patches + cfg.perceiver.num_queries + tokens
    kv_row = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * sequence * size
    prefill_row = sequence * (4 * llm.hidden_size + 2 * llm.intermediate_size) * size
    side, d = cfg.mask_size, cfg.perceiver.dim
    # Largest level: features, their norm, keys/values, the FF's 4x hidden and the attention output, alive together.
    perceiver_slice = side * side * d * (3 + cfg.perceiver.ff_mult + 2) * size
    batches = {"gen": int(headroom // (kv_row + prefill_row)), "encode": int(headroom // perceiver_slice),
               "decode": int(headroom // perceiver_slice)}
    print(f"memory: weights {weights / 1e9:.2f} GB, headroom {headroom / 1e9:.2f} GB under the budget; per answer "
          f"KV {kv_row / 1e6:.0f} MB + prefill {prefill_row / 1e6:.0f} MB, per slice perceiver "
          f"{perceiver_slice / 1e6:.0f} MB -> auto batches {batches}", flush=True)
    return {k: max(1, v) for k, v in batches.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config instead of the full model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16 on CUDA, float32 on the CPU (CPU bf16 matmuls are slow)")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per answer (min = max)")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--gen-batch", type=int, default=0, help="rows per generate call (0: auto, from the budget)")
    parser.add_argument("--encode-batch", type=int, default=0, help="slices per encode call (0: auto)")
    parser.add_argument("--decode-batch", type=int, default=0, help="slices per decode call (0: auto)")
    parser.add_argument("--time-limit", type=float, default=480, help="seconds after which the volume pass stops "
                        "and reports the slices it finished (the whole command stays under 10 minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="one-slice latency: best of this many")
    parser.add_argument("--perceiver-attention", default="sdpa", choices=["eager", "sdpa"],
                        help="the perceiver's attention kernel (eager = the official arithmetic)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = tiny_config() if args.tiny else full_config()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build(config, device, dtype)
    model.region_perceiver.attention_implementation = args.perceiver_attention
    sync(device)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())

    size, first_code = config.vision.image_size, model.codes.first_id
    gen = torch.Generator().manual_seed(0)
    prompt = [*torch.randint(0, first_code, (14,), generator=gen).tolist(), IMAGE_TOKEN_INDEX,
              *torch.randint(0, first_code, (12,), generator=gen).tolist()]
    options = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                logits_processors=[ForceCode(first_code + 3, min(5, args.tokens - 1), first_code)])
    pixels = torch.randn(args.slices, 3, size, size, generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name} ({device}), torch {torch.__version__}, dtype {dtype}, perceiver attention "
          f"{args.perceiver_attention}, "
          f"config {'tiny' if args.tiny else 'full'} ({params / 1e9:.2f} B parameters, built in {built:.1f} s)",
          flush=True)
    auto = auto_batches(model, len(prompt) - 1, args.tokens, BUDGET_MEMORY_GB * 1e9)
    gen_batch = min(args.gen_batch or auto["gen"], args.slices)
    encode_batch = args.encode_batch or min(auto["encode"], 32, gen_batch)  # 32: the Engine's encode batch
    decode_batch = args.decode_batch or min(auto["decode"], gen_batch)

    def run(rows: torch.Tensor) -> list[torch.Tensor]:
        return answer(model, rows, prompt, options, encode_batch, decode_batch)

    run(pixels[:2])  # warm-up
    latencies = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        masks = run(pixels[:1])
        sync(device)
        latencies.append(time.perf_counter() - t)
    if masks[0].shape[0] != 1:
        raise RuntimeError(f"expected one mask per answer, got {masks[0].shape[0]}")
    print(f"one-slice latency runs: {', '.join(f'{x:.3f}' for x in latencies)} s", flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    count = done = 0
    for i in range(0, args.slices, gen_batch):
        masks = run(pixels[i : i + gen_batch])
        count += sum(m.shape[0] for m in masks)
        done += len(masks)
        if time.perf_counter() - start > args.time_limit and done < args.slices:
            print(f"time limit {args.time_limit:.0f} s reached: throughput over the first {done} slices", flush=True)
            break
    sync(device)
    volume = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")

    print(f"answer: {args.tokens} new tokens, one forced region code, mask {masks[0].shape[-1]}^2; "
          f"prompt {len(prompt) - 1} text ids + {config.vision.num_patches + config.perceiver.num_queries} image "
          f"embeddings; batches: generate {gen_batch}, encode {encode_batch}, decode {decode_batch}")
    best = min(latencies)
    rate = done / volume
    print(f"{'measure':28s} {'measured':>12s} {'budget':>12s}  ok")
    print(f"{'one-slice latency (s)':28s} {best:12.3f} {'<= ' + str(BUDGET_LATENCY_S):>12s}  "
          f"{best <= BUDGET_LATENCY_S}")
    print(f"{f'{done}-slice throughput (sl/s)':28s} {rate:12.2f} {'>= ' + str(BUDGET_SLICES_PER_S):>12s}  "
          f"{rate >= BUDGET_SLICES_PER_S}")
    mem_ok = peak <= BUDGET_MEMORY_GB if peak == peak else "n/a (CPU)"
    print(f"{'peak GPU memory (GB)':28s} {peak:12.2f} {'<= ' + str(BUDGET_MEMORY_GB):>12s}  {mem_ok}")
    total = time.perf_counter() - start
    print(f"({done} slices in {volume:.2f} s, {count} masks decoded; whole command {total:.0f} s)")


if __name__ == "__main__":
    main()
