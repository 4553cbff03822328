"""The five MedSIGHT training stages on top of the shared loop (`medsight.train.loop.train`).

| stage | trains | loss |
|---|---|---|
| 1 | Region Perceiver (+ ViT with `train_vision`) | Hungarian Dice + BCE + class CE on the final head |
| 2 | codebook: to_code, codebooks, from_code, quantised head, modality predictor | `stage2_losses` + modality CE |
| 3 | `mm_projector` | LM CE |
| 4 | `token_projection` + the 576 code rows of the input embedding | LM CE + mask Dice + BCE |
| 5 | the whole language model with both projectors (vision side frozen) | LM CE + mask Dice + BCE |
| 5 LoRA (`lora`) | LoRA adapters (PEFT) + `mm_projector` + `token_projection` | as stage 5 |

Defaults of the stage configs are the official settings (spec: perceiver-and-codebook.md section 4,
lvlm-and-inference.md section 7.1); tests and the demo override steps, batch sizes and learning rates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from medsight.feature_cache import FeatureCache, encode_through_cache, weights_fingerprint
from medsight.model.adapter import (
    ADAPTER_CONFIG,
    LORA_TARGETS,
    LoraSettings,
    add_lora,
    base_fingerprint,
    check_base,
    restore_adapter,
    save_adapter,
)
from medsight.model.checkpoints import select_prefix
from medsight.model.loading import default_dtype
from medsight.model.medsight import MedSIGHTModel
from medsight.model.preprocess import ResizeMode
from medsight.model.vision import encode_image
from medsight.train import checks
from medsight.train.data import (
    ConversationDataset,
    ConversationSample,
    SegmentationBatch,
    SegmentationDataset,
    collate_conversations,
    collate_segmentation,
)
from medsight.train.loop import (
    CheckpointWeights,
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    resolve_device,
    seed_everything,
    train,
)
from medsight.train.losses import EOS_COEF, lvlm_losses, stage1_losses, stage2_losses

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Configs (official defaults)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: Adam(0.9, 0.99) lr 1e-4, global batch 48, 20 epochs, cosine to 1e-6, clip 1.0, fp32, seed 0.

    The official schedule steps once per epoch; here the same cosine is evaluated per optimizer step.
    `batch_size` is per process: the official run was 12 on each of 4 GPUs, so under torchrun use 48 / N.
    `train_vision` also trains the ViT (official: frozen), for models without pretrained vision weights.
    """

    batch_size: int = 48
    epochs: float = 20.0
    min_lr: float = 1e-6
    train_vision: bool = False
    eos_coef: float = EOS_COEF
    resize_mode: ResizeMode = "crop"

    _limits: ClassVar[dict[str, checks.Limit]] = {"eos_coef": checks.at_least(0, "a number")}


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: Adam(0.9, 0.99) lr 1e-4, batch 16, 3 epochs, cosine; only the codebook side trains.

    `warmup_doubling` reproduces the official soft-assignment warm-up value (2x the code) on every step; off by
    default because the soft gradient path of that warm-up is not reproduced by `RegionCodebook.quantize`.
    """

    batch_size: int = 16
    epochs: float = 3.0
    min_lr: float = 1e-6
    modality_loss_weight: float = 1.0
    warmup_doubling: bool = False
    resize_mode: ResizeMode = "crop"

    _limits: ClassVar[dict[str, checks.Limit]] = {"modality_loss_weight": checks.at_least(0, "a number")}


@dataclass
class LVLMConfig(TrainConfig):
    """Stages 3-5 (HF Trainer settings): AdamW (0.9, 0.999), no weight decay, warm-up 3 %, cosine, clip 1.0,
    batch 1 x grad-accum 8. The official runs used bf16; here `bf16` stays opt-in (autocast)."""

    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    batch_size: int = 1
    grad_accum: int = 8
    round_pixels_to_bf16: bool = True  # as at inference (the official tower ran in bf16)
    resize_mode: ResizeMode = "crop"
    data_root: str = ""  # where relative image/mask paths live; "" tries the JSON's folder and its parent
    pad_code_slots: bool = False  # deviation: batch samples with different code counts (see `lvlm_losses`)
    yes_no_weight: float = 1.0  # deviation when != 1: CE weight of a yes/no answer's first token (`lvlm_losses`)
    label_prompt_markup: bool = True  # False (deviation): label assistant turns only (`training_labels`)

    _limits: ClassVar[dict[str, checks.Limit]] = {"yes_no_weight": checks.at_least(0, "a number")}


@dataclass
class Stage3Config(LVLMConfig):
    """Stage 3: mm_projector only, lr 2e-5, 1 epoch, LM CE."""

    lr: float = 2e-5
    epochs: float = 1.0


@dataclass
class Stage4Config(LVLMConfig):
    """Stage 4: token_projection + code embedding rows, lr 5e-4, 3 epochs, CE + mask loss.

    `init_code_embeddings` writes mm_projector(from_code(unit codebook[m][k])) into each code's embedding row
    first (needs the stage-2 codebook on the model).
    """

    lr: float = 5e-4
    epochs: float = 3.0
    init_code_embeddings: bool = True


@dataclass
class Stage5Config(LVLMConfig):
    """Stage 5: the full language model + both projectors, lr 2e-5, 3 epochs, gradient checkpointing on.

    With `lora` the language model is frozen and trains LoRA adapters (PEFT) on `lora_targets` plus the
    `non_lora_trainables` (names in the language model, saved to `non_lora_trainables.bin`); `final/` is then the
    adapter folder in the official layout (`medsight.model.adapter`). `projector_lr` (> 0) is the learning rate of
    `mm_projector` (the official `mm_projector_lr`); `frozen_dtype` stores the frozen base weights of a LoRA run in
    that dtype: "auto" is bfloat16 on CUDA (half the memory; the run then computes under bf16 autocast, as the
    trained parts stay float32) and float32 elsewhere.
    """

    lr: float = 2e-5
    epochs: float = 3.0
    gradient_checkpointing: bool = True
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    non_lora_trainables: tuple[str, ...] = ("model.mm_projector", "model.token_projection")
    projector_lr: float = 0.0
    frozen_dtype: str = "auto"

    _limits: ClassVar[dict[str, checks.Limit]] = {
        "lora_r": checks.at_least(1),
        "lora_alpha": checks.at_least(1),
        "lora_dropout": checks.fraction(closed_top=False),
        "lora_targets": ((lambda v: len(v) > 0), "a non-empty list of module names"),
        "projector_lr": checks.at_least(0, "a number", "0: the main lr"),
        "frozen_dtype": checks.one_of("auto", "float32", "bfloat16"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora and self.export_official:
            # Refused, not ignored: the option promises a final_official/ folder a LoRA run would not write.
            raise ValueError("export_official does not apply to a LoRA run (lora: true): its final/ already is the "
                             "official adapter layout (adapter_config.json, adapter_model.safetensors, "
                             "non_lora_trainables.bin); set export_official to false")


@dataclass
class LoraConfig(Stage5Config):
    """The official downstream LoRA recipe (`finetune_lora_slake.sh`): r 16, alpha 32, dropout 0.05 on
    q/k/v/o/gate/up/down (not `lm_head`), lr 2e-4, `mm_projector` lr 2e-5, 6 epochs, batch 1 x grad-accum 4."""

    lora: bool = True
    lr: float = 2e-4
    projector_lr: float = 2e-5
    epochs: float = 6.0
    grad_accum: int = 4


STAGE_CONFIGS: dict[int, type[TrainConfig]] = {
    1: Stage1Config, 2: Stage2Config, 3: Stage3Config, 4: Stage4Config, 5: Stage5Config,
}
# Named recipes beyond the five stages: `medsight train lora` is stage 5 with the official LoRA defaults.
RECIPES: dict[str, tuple[int, type[TrainConfig]]] = {"lora": (5, LoraConfig)}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _prepare(model: MedSIGHTModel, config: TrainConfig, vision_side_only: bool = False) -> torch.device:
    """Move to the training device in float32 and freeze everything (each stage then unfreezes its part).

    `vision_side_only` (stages 1-2, which never run the language model): only the vision encoder, the perceiver and
    the codebook go to the device; the language model stays on the CPU as loaded (dtype unchanged), so the device
    holds what the stage needs (`medsight.train.plan.device_parameters`) and checkpoints still hold the whole model.
    """
    device = resolve_device(config)
    if vision_side_only:
        model.language_model.to("cpu")
        for part in (model.image_encoder, model.region_perceiver, model.codebook):
            if part is not None:
                part.to(device=device, dtype=torch.float32)
    else:
        model.to(device=device, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()  # frozen parts stay in eval mode; trainable parts are switched to train below
    return device


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _segmentation_data(data: Any, model: MedSIGHTModel, resize_mode: ResizeMode) -> SegmentationDataset:
    """The data of stages 1-2; with the codebook attached (stage 2) its modality labels are checked against it."""
    if isinstance(data, (str, Path)):
        v = model.config.vision
        modalities = None if model.codebook is None else model.codebook.cfg.num_modalities
        return SegmentationDataset(find_segmentation_meta(data), v.image_size, v.image_mean, v.image_std,
                                   resize_mode, model.config.perceiver.num_classes, modalities)
    return data


def _conversation_data(data: Any, model: MedSIGHTModel, config: LVLMConfig) -> ConversationDataset:
    if isinstance(data, (str, Path)):
        v = model.config.vision
        data = ConversationDataset(find_conversations(data), model.tokenizer, v.image_size, v.image_mean,
                                   v.image_std, config.resize_mode, config.data_root or None,
                                   label_prompt_markup=config.label_prompt_markup, codes=model.codes,
                                   max_length=model.config.llm.max_sequence_length,
                                   image_embeddings=model.config.image_embeddings)
    if isinstance(data, ConversationDataset):
        data.check_batches(config.batch_size, config.pad_code_slots)
    return data


def find_segmentation_meta(data: str | Path) -> Path:
    """A meta JSON itself, or the train meta file inside a data folder (demo layout)."""
    return _file_or_inside(data, ("biomedparse_meta_train.json", "biomedparse_meta.json"))


def find_conversations(data: str | Path) -> Path:
    """A conversation JSON itself, or `lvlm/train.json` / `train.json` inside a data folder."""
    return _file_or_inside(data, ("lvlm/train.json", "train.json"))


def _file_or_inside(data: str | Path, names: tuple[str, ...]) -> Path:
    """`data` when it is a file, else the first of `names` inside it."""
    path = Path(data)
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{data}: no {' or '.join(names)}")


def _grid_and_cls(model: MedSIGHTModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = encode_image(model.image_encoder, pixels, model.config.vision.select_layer)
    return feats.grid, feats.cls


# ----------------------------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------------------------
def run_stage1(model: MedSIGHTModel, data: Any, config: Stage1Config, out_dir: str | Path,
               resume: bool | str = False) -> TrainResult:
    """Train the Region Perceiver (and optionally the ViT) with the Hungarian Dice + BCE + CE criterion.

    Args:
        data: a `SegmentationDataset`, a meta JSON, or a folder holding `biomedparse_meta_train.json`.
    """
    device = _prepare(model, config, vision_side_only=True)
    dataset = _segmentation_data(data, model, config.resize_mode)
    model.region_perceiver.requires_grad_(True).train()
    if config.train_vision:
        model.image_encoder.requires_grad_(True).train()

    def loss_fn(batch: SegmentationBatch) -> dict[str, torch.Tensor]:
        pixels = batch.pixels.to(device)
        with torch.set_grad_enabled(config.train_vision):  # a frozen ViT needs no graph
            grid, _ = _grid_and_cls(model, pixels)
        out = model.region_perceiver(grid)
        masks = [m.to(device) for m in batch.masks]
        classes = [c.to(device) for c in batch.classes]
        terms = stage1_losses(out.seg_logits.float(), out.class_logits.float(), masks, classes,
                              eos_coef=config.eos_coef)
        loss = terms["dice"] + terms["bce"] + terms["cls"]
        return {"loss": loss, "dice": terms["dice"], "bce": terms["bce"], "cls": terms["cls"]}

    return train(model, trainable_parameters(model), dataset, collate_segmentation, loss_fn, config, out_dir,
                 resume, name="stage1")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------------
def run_stage2(model: MedSIGHTModel, data: Any, config: Stage2Config, out_dir: str | Path,
               resume: bool | str = False) -> TrainResult:
    """Train the modality codebook with the perceiver frozen; samples route to their GT modality's codebook."""
    if model.codebook is None:
        # Seeded: a run is reproducible from its seed, and under torchrun every rank starts from the same codebook
        # (FSDP shards each rank's own copy without comparing them).
        seed_everything(config.seed)
        model.attach_codebook()
    device = _prepare(model, config, vision_side_only=True)
    dataset = _segmentation_data(data, model, config.resize_mode)
    codebook = model.codebook
    assert codebook is not None
    codebook.requires_grad_(True).train()
    num_modalities = codebook.cfg.num_modalities

    def loss_fn(batch: SegmentationBatch) -> dict[str, torch.Tensor]:
        bad = [m for m in batch.modalities if not 0 <= m < num_modalities]
        if bad:
            raise ValueError(f"modality labels {bad} outside the codebook's {num_modalities} modalities")
        with torch.no_grad():  # frozen ViT and perceiver
            grid, cls = _grid_and_cls(model, batch.pixels.to(device))
            out = model.region_perceiver(grid)
        masks = [m.to(device) for m in batch.masks]
        classes = [c.to(device) for c in batch.classes]
        terms = stage2_losses(out, codebook, batch.modalities, masks, classes, config.warmup_doubling)
        target = torch.tensor(batch.modalities, device=device)
        modality_ce = F.cross_entropy(codebook.modality_predictor(cls).float(), target)
        loss = terms["loss"] + config.modality_loss_weight * modality_ce
        keys = ("dice_quant", "bce_quant", "cls_quant", "vq_loss", "commit_loss", "recon_mse")
        return {"loss": loss, **{k: terms[k] for k in keys}, "modality_ce": modality_ce}

    return train(model, trainable_parameters(model), dataset, collate_segmentation, loss_fn, config, out_dir,
                 resume, name="stage2")


# ----------------------------------------------------------------------------------------------------------------
# Stages 3-5
# ----------------------------------------------------------------------------------------------------------------
def _lvlm_loss_fn(model: MedSIGHTModel, config: LVLMConfig, device: torch.device, with_masks: bool,
                  cache: FeatureCache | None):
    # The vision side is frozen in stages 3-5, so a caller may hand a cache that keeps each image's encoding. The
    # key names the frozen weights, not the model object: one cache serves every stage and copy with those weights.
    identity = "" if cache is None else (
        f"train:{weights_fingerprint(model.image_encoder, model.region_perceiver)}:{model.dtype}:{device}")

    def loss_fn(batch: list[ConversationSample]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([s.pixels for s in batch]).to(device)
        if cache is None:
            encoding = model.encode(pixels, config.round_pixels_to_bf16)  # frozen vision side, no graph
        else:
            encoding = encode_through_cache(cache, model.encode, pixels, config.round_pixels_to_bf16, identity)
        masks = [None if s.masks is None else s.masks.to(device) for s in batch]
        out = lvlm_losses(model, [s.input_ids for s in batch], [s.labels for s in batch], encoding, masks,
                          pad_code_slots=config.pad_code_slots, yes_no_weight=config.yes_no_weight)
        if not with_masks:
            return {"loss": out.ce_loss, "ce": out.ce_loss}
        return {"loss": out.loss, "ce": out.ce_loss, "mask": out.mask_loss, "dice": out.dice_loss,
                "bce": out.bce_loss}

    return loss_fn


def _run_lvlm(model: MedSIGHTModel, dataset, config: LVLMConfig, out_dir, resume: bool | str, name: str,
              with_masks: bool, params=None, grad_masks=None, finalize=None,
              cache: FeatureCache | None = None, weights: CheckpointWeights | None = None) -> TrainResult:
    device = next(model.parameters()).device
    lm = model.language_model
    if config.gradient_checkpointing:
        # Non-reentrant: works when the checkpointed inputs (embeddings) do not require grad themselves.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return train(model, params or trainable_parameters(model), dataset, collate_conversations,
                     _lvlm_loss_fn(model, config, device, with_masks, cache), config, out_dir, resume, name=name,
                     grad_masks=grad_masks, finalize=finalize, weights=weights)
    finally:
        if config.gradient_checkpointing:
            lm.gradient_checkpointing_disable()


def run_stage3(model: MedSIGHTModel, data: Any, config: Stage3Config, out_dir: str | Path,
               resume: bool | str = False, cache: FeatureCache | None = None) -> TrainResult:
    """Vision -> text alignment: only `mm_projector` trains, on the LM cross-entropy."""
    _prepare(model, config)
    dataset = _conversation_data(data, model, config)
    model.language_model.train()  # no dropout in Qwen3; train mode matters for gradient checkpointing
    model.language_model.mm_projector.requires_grad_(True)
    return _run_lvlm(model, dataset, config, out_dir, resume, "stage3", with_masks=False, cache=cache)


CODEBOOK_NEEDED = ("stage-4 embedding initialisation needs the stage-2 codebook on the model (start from a "
                   "stage-2/3 output, or set init_code_embeddings=false)")


def initialises_code_rows(config: TrainConfig, out_dir: str | Path, resume: bool) -> bool:
    """Whether a stage-4 run writes the code rows from the codebook: a resumed run takes them from its checkpoint."""
    return getattr(config, "init_code_embeddings", False) and not (resume and latest_checkpoint(out_dir))


@torch.no_grad()
def init_code_embeddings(model: MedSIGHTModel) -> torch.Tensor:
    """Write mm_projector(from_code(unit code)) into the input-embedding row of every region code.

    Rows are in the official `m * codebook_size + k` order; with fewer code vectors than code tokens they wrap
    around (official behaviour). Returns the (num_codes, hidden) rows written.
    """
    codebook = model.codebook
    if codebook is None:
        raise ValueError(CODEBOOK_NEEDED)
    units = [F.normalize(codebook.codebooks[str(m)].embedding.weight, p=2, dim=-1)
             for m in range(codebook.cfg.num_modalities)]
    lm = model.language_model
    projector = lm.mm_projector
    vectors = projector(codebook.from_code(torch.cat(units).to(model.dtype)).to(next(projector.parameters()).dtype))
    first, count = model.codes.first_id, model.codes.num_codes
    rows = vectors[torch.arange(count, device=vectors.device) % vectors.shape[0]]
    weight = lm.get_input_embeddings().weight
    weight[first : first + count] = rows.to(weight.dtype)
    return rows


EMBED_WEIGHT = "language_model.model.embed_tokens.weight"


def code_row_mask(model: MedSIGHTModel) -> torch.Tensor:
    """(vocab, 1) float: 1 on the region-code rows of the input embedding, 0 elsewhere."""
    weight = model.language_model.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[model.codes.first_id : model.codes.first_id + model.codes.num_codes] = 1
    return mask


def run_stage4(model: MedSIGHTModel, data: Any, config: Stage4Config, out_dir: str | Path,
               resume: bool | str = False, cache: FeatureCache | None = None) -> TrainResult:
    """Text -> vision alignment: `token_projection` and the 576 code embedding rows train (CE + mask loss).

    The code rows are trained in place: the whole `embed_tokens` weight requires grad and every non-code row of its
    gradient is zeroed before each optimizer step (also on the shards of a torchrun run).
    With zero gradient and weight decay 0, Adam/AdamW leave those rows exactly unchanged
    (equivalent to the official SplitEmbedding, and the checkpoint keeps the plain `embed_tokens.weight` key).
    """
    if config.weight_decay != 0:
        raise ValueError("stage 4 needs weight_decay=0: decoupled decay would also move the frozen embedding rows")
    _prepare(model, config)
    dataset = _conversation_data(data, model, config)
    if initialises_code_rows(config, out_dir, resume):
        init_code_embeddings(model)
    lm = model.language_model
    lm.train()
    lm.token_projection.requires_grad_(True)
    lm.get_input_embeddings().weight.requires_grad_(True)
    masks = {EMBED_WEIGHT: code_row_mask(model)}
    return _run_lvlm(model, dataset, config, out_dir, resume, "stage4", with_masks=True, grad_masks=masks,
                     cache=cache)


def run_stage5(model: MedSIGHTModel, data: Any, config: Stage5Config, out_dir: str | Path,
               resume: bool | str = False, cache: FeatureCache | None = None) -> TrainResult:
    """Grounded instruction tuning: every language-model parameter trains (vision side and codebook frozen),
    or with `config.lora` LoRA adapters and the listed non-LoRA parameters."""
    _prepare(model, config)
    dataset = _conversation_data(data, model, config)
    if not config.lora:
        model.language_model.requires_grad_(True).train()
        return _run_lvlm(model, dataset, config, out_dir, resume, "stage5", with_masks=True, cache=cache)
    # The base the adapter is for, taken before LoRA goes in and the frozen weights change dtype: recorded beside it
    # so that ask, serve, eval and merge refuse another base (`medsight.model.adapter.check_base`).
    base = {"base_model": config.init_from, "weights_fingerprint": base_fingerprint(model)}
    peft_model, groups, non_lora = add_lora_for_training(model, config)
    if lora_frozen_dtype(config, model.device) != torch.float32:
        config = replace(config, bf16=True)  # float32 trainables meet a bf16 base: autocast makes them agree

    def finalize(folder: Path, state: dict[str, torch.Tensor] | None) -> Path:
        lm_state = None if state is None else select_prefix(state, "language_model.")
        return save_adapter(peft_model, folder, non_lora, lm_state, base)

    # Step checkpoints hold what the run trains, in final/'s layout (an adapter `--adapter` takes), not the frozen
    # base as well (about 18 GB per step for the 8B model); a resume rebuilds the base from init_from.
    weights = CheckpointWeights(
        save=finalize,
        load=lambda folder: restore_adapter(peft_model, folder, non_lora, base["weights_fingerprint"],
                                            config.init_from),
        check=lambda folder: check_base(folder, base["weights_fingerprint"], config.init_from),
        is_saved=lambda folder: (folder / ADAPTER_CONFIG).is_file())
    return _run_lvlm(model, dataset, config, out_dir, resume, "stage5-lora", with_masks=True, params=groups,
                     finalize=finalize, cache=cache, weights=weights)


def lora_frozen_dtype(config: Stage5Config, device: torch.device) -> torch.dtype:
    if config.frozen_dtype == "auto":
        return default_dtype(device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if config.frozen_dtype not in dtypes:
        raise ValueError(f"frozen_dtype {config.frozen_dtype!r}: use auto, float32 or bfloat16")
    return dtypes[config.frozen_dtype]


#: The layer kinds PEFT's LoRA can adapt (a target naming another kind, e.g. a norm, fails inside PEFT).
LORA_LAYER_KINDS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def check_lora_targets(language_model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Every `lora_targets` entry must name a layer LoRA can adapt, by PEFT's rule for a list of names (the module's
    full name or a dotted suffix of it). PEFT itself only refuses a list none of whose entries matches, and only once
    the model is built; a misspelt entry beside good ones ("qproj") was silently dropped. `language_model` may live on
    the meta device (the CLI checks before building the model)."""
    names = [n for n, m in language_model.named_modules() if isinstance(m, LORA_LAYER_KINDS)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not unmatched:
        return
    # Each layer by its last name, or its last two where the last is a position (mm_projector.0).
    short = {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names}
    raise ValueError(f"field 'lora_targets': {', '.join(checks.unknown_fields(unmatched, short))} names no layer of "
                     f"the language model that LoRA can adapt; its layers: {', '.join(sorted(short))} "
                     f"(official: {', '.join(LORA_TARGETS)})")


def check_non_lora_trainables(names: Sequence[str], wanted: Sequence[str], with_lora: bool = True) -> list[str]:
    """The parameter names (of the language model) that `wanted` selects, each entry a name or a module prefix; an
    entry that selects none is a ValueError. `with_lora` False: `names` are of the model before LoRA goes in (the CLI
    checks on the meta device before building it), where entries naming LoRA's own parameters cannot match yet."""
    selected = [n for n in names if any(n == p or n.startswith(p + ".") for p in wanted)]
    unmatched = [p for p in wanted if not any(n == p or n.startswith(p + ".") for n in selected)
                 and (with_lora or "lora_" not in p)]
    if unmatched:
        raise ValueError(f"non_lora_trainables not found in the language model: {', '.join(unmatched)}")
    return selected


def add_lora_for_training(model: MedSIGHTModel, config: Stage5Config):
    """Inject LoRA, unfreeze the non-LoRA trainables, store the frozen base in `frozen_dtype`.

    Returns (the PeftModel, optimizer param groups, the non-LoRA parameter names in the language model).
    """
    frozen_dtype = lora_frozen_dtype(config, model.device)
    lm = model.language_model
    check_lora_targets(lm, config.lora_targets)
    seed_everything(config.seed)  # PEFT draws lora_A at random: same on every rank, reproducible from the seed
    peft_model = add_lora(model, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                              tuple(config.lora_targets)))
    lm.train()
    named = dict(lm.named_parameters())
    non_lora = check_non_lora_trainables(named, config.non_lora_trainables)
    for name in non_lora:
        named[name].requires_grad_(True)
    for param in lm.parameters():
        if not param.requires_grad:
            param.data = param.data.to(frozen_dtype)
    projector = [p for n, p in named.items() if p.requires_grad and "mm_projector" in n]
    rest = [p for n, p in named.items() if p.requires_grad and "mm_projector" not in n]
    groups = [{"params": rest}]
    if projector:
        groups.append({"params": projector, "lr": config.projector_lr or config.lr})
    return peft_model, groups, non_lora


RUNNERS = {1: run_stage1, 2: run_stage2, 3: run_stage3, 4: run_stage4, 5: run_stage5}
