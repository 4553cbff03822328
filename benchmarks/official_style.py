"""Engine vs an in-repo re-implementation of the official inference loop, same weights, same process (not a test).

The official-style loop, per slice and at batch 1: preprocess, ViT + perceiver, build `inputs_embeds`, Hugging Face
`generate(output_hidden_states=True, return_dict_in_generate=True)`, take the last-layer states at the codes (the
end-of-prompt state when there is none, as the official code does), `token_projection`, a full perceiver re-run,
and the mask resized to the slice. No feature cache, no batching.

The Engine asks about all slices at once (feature cache cleared first), with `no_code_fallback=True` so both paths
decode at least one mask per slice.

Usage: python benchmarks/official_style.py [--model tiny|demo] [--slices 64] [--tokens 16] [--repeats 2]
Prints per-slice latency, slices/s, the ratio, and peak memory (RSS growth on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import argparse
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import medsight
from medsight.engine import VolumeSlices
from medsight.model.medsight import MedSIGHTModel
from medsight.model.perceiver import ATTENTION_IMPLEMENTATIONS
from medsight.model.vision import encode_image
from medsight.prompt import Message, tokenize_prompt

QUESTION = "Please segment the white matter."


def mni_volume():
    """The MNI152 template as a medsight Volume (same as benchmarks/engine_throughput.py)."""
    from nilearn.datasets import load_mni152_template

    from medsight.imaging import Volume

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return Volume(data, spacing=tuple(spacing), origin=tuple(lps[:3, 3]), direction=lps[:3, :3] / spacing,
                  modality="MR")


def slice_images(volume, indices: list[int]) -> list[np.ndarray]:
    """8-bit axial slices windowed exactly as the Engine windows them (one window for the volume)."""
    from medsight.imaging import choose_window, extract_slice, to_rgb

    window = choose_window(volume.array, volume.modality, None)
    return [to_rgb(extract_slice(volume, "axial", i).pixels, volume.modality, center=window.center,
                   width=window.width, invert=volume.invert_display) for i in indices]


@torch.no_grad()
def official_slice(model: MedSIGHTModel, image: np.ndarray, prompt: list[int], tokens: int) -> np.ndarray:
    """One slice the official way; returns the (K, H, W) boolean masks on the slice."""
    pixels, _ = model.prepare(image, "letterbox")
    pixels = pixels[None].to(torch.bfloat16).to(device=model.device, dtype=model.dtype)
    feats = encode_image(model.image_encoder, pixels, model.config.vision.select_layer)
    grid = feats.grid
    region = model.region_perceiver(grid).queries
    lm = model.language_model
    embeds = lm.mm_projector(torch.cat([feats.patches, region], dim=1))
    inputs, mask = lm.embed_prompts([prompt], list(embeds), model.config.llm.max_sequence_length)
    out = lm.generate(
        inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True, return_dict_in_generate=True,
        do_sample=False, repetition_penalty=1.2, max_new_tokens=tokens, min_new_tokens=tokens,
        pad_token_id=model.config.llm.pad_token_id, eos_token_id=model.config.llm.eos_token_id,
    )
    new = out.sequences[0, -len(out.hidden_states):] if out.sequences.shape[1] > len(out.hidden_states) \
        else out.sequences[0]
    where = torch.nonzero(model.codes.is_code(new)).flatten().tolist()
    # hidden_states[t][-1] is the last layer at step t; its last position is the state that predicted token t.
    states = [out.hidden_states[t][-1][0, -1] for t in where] or [out.hidden_states[0][-1][0, -1]]
    codes = lm.token_projection(torch.stack(states)[None])
    logits = model.region_perceiver(grid, codes.to(model.dtype)).seg_logits  # full re-run, no cache
    h, w = image.shape[:2]
    return (F.interpolate(logits.float(), size=(h, w), mode="bilinear").sigmoid() > 0.5)[0].cpu().numpy()


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or RSS sampled every 2 ms on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._top = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._top, self._rss()) - self._base


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed, mem.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset (tiny, demo) or a model folder")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of both paths; best is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--onnx-dir", help="run the Engine's vision side in ONNX Runtime (medsight export-onnx of the "
                        "same model); the official path stays in PyTorch")
    parser.add_argument("--perceiver-attention", choices=ATTENTION_IMPLEMENTATIONS, default=None,
                        help="the Engine's perceiver kernel (default: the Engine's default); the official path "
                        "always runs eager")
    args = parser.parse_args()

    kernel = {} if args.perceiver_attention is None else {"perceiver_attention": args.perceiver_attention}
    engine = medsight.Engine.load(args.model, device=args.device, onnx_dir=args.onnx_dir, **kernel)
    model, device = engine.model, engine.model.device
    volume = mni_volume()
    first = max(0, (volume.array.shape[0] - args.slices) // 2)
    indices = list(range(first, first + args.slices))
    images = slice_images(volume, indices)
    prompt = tokenize_prompt(model.tokenizer, [Message("user", QUESTION)], num_images=1)
    options = medsight.GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, no_code_fallback=True)
    request = VolumeSlices(volume, "axial", indices)

    def run_engine() -> None:
        engine.clear_cache()
        engine.ask(request, QUESTION, options)

    engine_kernel = model.region_perceiver.attention_implementation

    @contextmanager
    def official_kernel():
        """The same weights, with the official attention arithmetic."""
        model.region_perceiver.attention_implementation = "eager"
        try:
            yield
        finally:
            model.region_perceiver.attention_implementation = engine_kernel

    def run_official() -> None:
        with official_kernel():
            for image in images:
                official_slice(model, image, prompt, args.tokens)

    official_slice(model, images[0], prompt, args.tokens)  # warm-up both paths
    engine.ask(VolumeSlices(volume, "axial", indices[:2]), QUESTION, options)
    results: dict[str, list[tuple[float, int]]] = {"engine": [], "official": []}
    for _ in range(args.repeats):
        results["official"].append(timed(run_official, device))
        results["engine"].append(timed(run_engine, device))
    one_engine = min(timed(lambda: (engine.clear_cache(), engine.ask(VolumeSlices(volume, "axial", [indices[0]]),
                                                                      QUESTION, options)), device)[0]
                     for _ in range(3))
    with official_kernel():
        one_official = min(timed(lambda: official_slice(model, images[0], prompt, args.tokens), device)[0]
                           for _ in range(3))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}, dtype {model.dtype}, model {args.model}, "
          f"engine perceiver attention {engine_kernel}")
    print(f"{args.slices} axial MNI152 slices, {args.tokens} new tokens each (min = max), >= 1 mask per slice; "
          f"best of {args.repeats} alternating runs")
    best = {k: min(v, key=lambda r: r[0]) for k, v in results.items()}
    for name in ("official", "engine"):
        seconds, peak = best[name]
        runs = ", ".join(f"{s:.2f}" for s, _ in results[name])
        print(f"{name:9s} volume: {args.slices / seconds:8.2f} slices/s  {1000 * seconds / args.slices:8.1f} ms/slice "
              f"(runs: {runs} s)  peak memory +{peak / 2**20:.0f} MiB")
    print(f"one slice: official {1000 * one_official:.1f} ms, engine {1000 * one_engine:.1f} ms "
          f"(ratio {one_official / one_engine:.2f}x)")
    print(f"volume throughput ratio (engine / official): {best['official'][0] / best['engine'][0]:.2f}x")


if __name__ == "__main__":
    main()
