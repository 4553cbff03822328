"""Memory per GPU of each training stage: plain, FSDP (sharded) and LoRA, from the parameter counts.

Parameter counts come from the model built on PyTorch's meta device (`medsight.model.sizes.meta_model`). Bytes per
parameter, as our trainer stores them:

- plain: every GPU holds the whole model in float32 (4 B/param) plus, per trainable parameter, a float32 gradient
  and AdamW's two float32 moments (12 B): 16 B per trainable parameter in all. Stages 1-2 leave the language model
  on the CPU: their GPUs hold only the vision encoder, the perceiver and the codebook (`device_parameters`). On N
  GPUs this is data-parallel replication (what a DDP run would need); our torchrun path always shards (fsdp).
- fsdp: the same float32 master weights, gradients and moments divided over N GPUs, plus the working copies: the
  root unit (vision encoder, perceiver, codebook) unsharded in bf16 and three bf16 copies of the largest FSDP unit
  (the one computing, the one prefetched, and its gradient before the reduce-scatter).
- lora: the frozen base in bf16 (2 B/param, `frozen_dtype: bfloat16`), the adapters and non-LoRA trainables at
  16 B/param; sharded like fsdp when N > 1.

Activation estimate (bf16, stated, not measured): one sequence of `max_sequence_length` tokens (2048) per GPU for
stages 3-5 (the official per-device batch 1):
- decoder layers: with gradient checkpointing each layer keeps its input (T x hidden) and one layer is recomputed
  at a time, T x (8 hidden + 4 intermediate) values; without it every layer keeps the latter;
- the logits: T x vocabulary in bf16, their float32 upcast and its gradient (10 B per value);
- the perceiver decode with gradients (stages 4-5): 5 x its widest activation, mask pixels (192^2) x 4 dim x 2 B;
- stages 1-2 train the perceiver on images: the same 5 x widest activation per image, on the stage's batch
  divided over the GPUs.
Plus 2 GiB for the CUDA context and allocator, and 5 % fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medsight.config import MedSIGHTConfig
from medsight.model.adapter import LoraSettings
from medsight.model.codebook import RegionCodebook
from medsight.model.sizes import meta_model

GIB = 1024**3
GPU_COUNTS = (1, 2, 4, 8)
MODES = ("plain", "fsdp", "lora")
STAGES = (1, 2, 3, 4, 5)
OVERHEAD_BYTES = 2 * GIB
FRAGMENTATION = 1.05


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the parts that decide memory."""

    vision: int
    perceiver: int
    codebook: int
    language_model: int
    embed: int
    lm_head: int
    layer: int
    mm_projector: int
    token_projection: int
    lora: int

    @property
    def total(self) -> int:
        return self.vision + self.perceiver + self.codebook + self.language_model

    @property
    def root_unit(self) -> int:
        return self.vision + self.perceiver + self.codebook

    @property
    def largest_unit(self) -> int:
        return max(self.layer, self.embed, self.lm_head)


def count_parameters(config: MedSIGHTConfig, lora: LoraSettings | None = None) -> Counts:
    lora = lora or LoraSettings()
    with torch.device("meta"):
        model = meta_model(config)
        codebook = RegionCodebook(config.codebook, config.perceiver)

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm = model.language_model
    adapters = 0
    for name, module in lm.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.targets:
            adapters += lora.r * (module.in_features + module.out_features)
    return Counts(n(model.image_encoder), n(model.region_perceiver), n(codebook), n(lm), n(lm.model.embed_tokens),
                  n(lm.lm_head), n(lm.model.layers[0]), n(lm.model.mm_projector), n(lm.model.token_projection),
                  adapters)


def trainable(counts: Counts, stage: int, mode: str) -> int:
    """Parameters with gradients and optimizer states: the stage's trainable set (LoRA: adapters + projectors)."""
    if mode == "lora":
        if stage != 5:
            raise ValueError("LoRA applies to stage 5 (and downstream fine-tuning) only")
        return counts.lora + counts.mm_projector + counts.token_projection
    # Stage 4 trains 576 embedding rows, but the whole matrix carries gradients and moments (masked rows).
    return {1: counts.perceiver, 2: counts.codebook, 3: counts.mm_projector,
            4: counts.token_projection + counts.embed, 5: counts.language_model}[stage]


def activation_bytes(config: MedSIGHTConfig, stage: int, gpus: int, batch: int = 1,
                     checkpointing: bool | None = None) -> int:
    """The stated activation estimate (module docstring) for one GPU."""
    p = config.perceiver
    perceiver = 5 * config.mask_size**2 * p.dim * p.ff_mult * 2
    if stage in (1, 2):
        return perceiver * math.ceil(batch / gpus)
    llm = config.llm
    tokens, hidden, inter = llm.max_sequence_length, llm.hidden_size, llm.intermediate_size
    per_layer = tokens * (8 * hidden + 4 * inter) * 2
    checkpointing = stage == 5 if checkpointing is None else checkpointing
    layers = (tokens * hidden * 2 * llm.num_hidden_layers + per_layer if checkpointing
              else per_layer * llm.num_hidden_layers)
    logits = tokens * llm.vocab_size * 10
    return layers + logits + (perceiver if stage in (4, 5) else 0)


def device_parameters(counts: Counts, stage: int) -> int:
    """Parameters a stage keeps on the training device: stages 1-2 never run the language model and leave it on the
    CPU (`medsight.train.stages`), so only the vision encoder, the perceiver and (stage 2, which creates it) the
    codebook go there."""
    return {1: counts.vision + counts.perceiver, 2: counts.root_unit}.get(stage, counts.total)


def state_bytes(counts: Counts, stage: int, mode: str, gpus: int) -> float:
    """Bytes of weights, gradients, optimizer moments and FSDP working copies on one GPU (no activations)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    train = trainable(counts, stage, mode)
    on_device = device_parameters(counts, stage)
    if mode == "plain":
        return 4 * on_device + 12 * train
    frozen_bytes = 2 if mode == "lora" else 4
    states = (frozen_bytes * (on_device - train) + 16 * train) / gpus
    # Stages 1-2 shard only the root unit: the language model's units stay on the CPU.
    units = 0 if stage in (1, 2) else 3 * counts.largest_unit
    working = 2 * (counts.root_unit + units) if gpus > 1 else 0
    return states + working


def memory_per_gpu(config: MedSIGHTConfig, counts: Counts, stage: int, mode: str, gpus: int,
                   batch: int = 1) -> int:
    """Bytes one GPU needs for `stage` under `mode` on `gpus` GPUs (see the module docstring)."""
    activations = activation_bytes(config, stage, gpus, batch)
    return int((state_bytes(counts, stage, mode, gpus) + activations) * FRAGMENTATION + OVERHEAD_BYTES)


def plan_table(config: MedSIGHTConfig, gpu_gib: float, batches: dict[int, int] | None = None) -> str:
    """A Markdown table: GiB per GPU for each stage and mode on 1, 2, 4 and 8 GPUs; * marks what does not fit."""
    counts = count_parameters(config)
    batches = batches or {}
    header = f"| stage | trainable | mode | {' | '.join(f'{n} GPU' for n in GPU_COUNTS)} |"
    lines = [header, "|" + "---|" * (3 + len(GPU_COUNTS))]
    for stage in STAGES:
        for mode in MODES:
            if mode == "lora" and stage != 5:
                continue
            cells = [_cell(memory_per_gpu(config, counts, stage, mode, n, batches.get(stage, 1)), gpu_gib)
                     for n in GPU_COUNTS]
            label = f"{stage} (LoRA)" if mode == "lora" else str(stage)
            lines.append(f"| {label} | {trainable(counts, stage, mode) / 1e9:.3f} B | {mode} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _cell(nbytes: int, gpu_gib: float) -> str:
    gib = nbytes / GIB
    return f"{gib:.1f}" + ("" if gib <= gpu_gib else " *")


def check_fits(config: MedSIGHTConfig, stage: int, mode: str, gpus: int, gpu_gib: float, batch: int = 1) -> None:
    """Raise a ValueError when the run would not fit, naming the configurations that would."""
    counts = count_parameters(config)
    need = memory_per_gpu(config, counts, stage, mode, gpus, batch) / GIB
    if need <= gpu_gib:
        return
    options = []
    for option in MODES:
        if option == "lora" and stage != 5:
            continue
        for n in GPU_COUNTS:
            size = memory_per_gpu(config, counts, stage, option, n, batch) / GIB
            if size <= gpu_gib:
                options.append(f"{option} on {n} GPU{'s' if n > 1 else ''} ({size:.1f} GiB each)")
                break
    what = "; ".join(options) if options else f"nothing up to {GPU_COUNTS[-1]} GPUs of {gpu_gib:g} GiB"
    raise ValueError(f"stage {stage} ({mode}) of the {config.name} model needs about {need:.1f} GiB per GPU on "
                     f"{gpus} GPU{'s' if gpus > 1 else ''}, more than the {gpu_gib:g} GiB available. What fits "
                     f"(`medsight train plan`): {what}")
