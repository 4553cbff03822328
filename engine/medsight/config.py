"""Model configurations as data: dataclasses with named presets that round-trip through JSON.

`full` is the published MedSIGHT (UniMed-CLIP ViT-L/14-336 + Region Perceiver + Qwen3-8B); `tiny` has
the shapes of the golden parity fixtures and keeps tests fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenAI-CLIP normalisation, used by UniMed-CLIP's validation transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The open_clip ViT used as image encoder (only the visual tower is built)."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_ratio: float = 4.0
    embed_dim: int = 768  # the CLIP output projection; present in checkpoints, unused by MedSIGHT
    quick_gelu: bool = True
    # Features are the output of this transformer block (before ln_post). The released perceiver
    # was trained on the last block (-1), whatever the LVLM config's mm_vision_select_layer says.
    select_layer: int = -1
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class PerceiverConfig:
    """The Region Perceiver (stage 1)."""

    dim: int = 1024
    num_queries: int = 20
    num_stages: int = 3
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    num_classes: int = 17  # plus one "no object" logit


@dataclass
class CodebookConfig:
    """The stage-2 modality-aware codebook: one L2-normalised codebook per modality label."""

    num_modalities: int = 18
    codebook_size: int = 32
    code_dim: int = 64
    beta: float = 0.25  # commitment weight, hard-coded in the official quantizer
    warmup_calls: int = 10_000  # per-codebook calls in training mode with the soft assignment

    @property
    def num_codes(self) -> int:
        return self.num_modalities * self.codebook_size


@dataclass
class LLMConfig:
    """The Qwen3 decoder plus the MedSIGHT projector sizes."""

    vocab_size: int = 152_245  # base tokenizer (151669) + 576 region codes
    hidden_size: int = 4096
    intermediate_size: int = 12_288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40_960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 151_643
    eos_token_id: int = 151_645  # <|im_end|>
    pad_token_id: int = 151_643  # <|endoftext|>
    max_sequence_length: int = 2048  # the official code truncates every sequence to this many embeddings
    mm_projector_type: str = "mlp2x_gelu"

    @property
    def first_code_id(self) -> int:
        return self.vocab_size - CodebookConfig().num_codes


@dataclass
class MedSIGHTConfig:
    """Everything needed to build a MedSIGHT model; weights come separately."""

    name: str = "full"
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    #: Which last-layer state decodes a region code when a request does not say: "before" (the state that
    #: predicted the code: the official inference path, right for the released checkpoints) or "at" (the state
    #: of the code token itself, which is what training optimises: right for models trained by `medsight.train`).
    code_state_position: str = "before"

    def __post_init__(self) -> None:
        if self.code_state_position not in ("before", "at"):
            raise ValueError(f"code_state_position must be 'before' or 'at', not {self.code_state_position!r}")
        if self.vision.width != self.perceiver.dim:
            # The perceiver works directly on the ViT grid, so the widths must agree.
            raise ValueError(
                f"vision.width ({self.vision.width}) must equal perceiver.dim ({self.perceiver.dim})"
            )
        if self.llm.vocab_size <= self.codebook.num_codes:
            raise ValueError(f"llm.vocab_size ({self.llm.vocab_size}) leaves no room for the region codes")

    @property
    def mask_size(self) -> int:
        """Side of the perceiver's mask logits: the ViT grid doubled by each perceiver stage."""
        return self.vision.grid_size * 2**self.perceiver.num_stages

    @property
    def image_embeddings(self) -> int:
        """Embeddings one image adds to a sequence in place of its placeholder: its patch tokens and the perceiver's
        region tokens (the language model's limit, `llm.max_sequence_length`, counts them)."""
        return self.vision.num_patches + self.perceiver.num_queries

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedSIGHTConfig:
        parts = {
            "vision": VisionConfig,
            "perceiver": PerceiverConfig,
            "codebook": CodebookConfig,
            "llm": LLMConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _dataclass_from_dict(parts[key], value, key)
            elif key in ("name", "code_state_position"):
                kwargs[key] = value
            else:
                raise ValueError(f"unknown MedSIGHT config field {key!r}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> MedSIGHTConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


def _dataclass_from_dict(kind: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) in config section {where!r}: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return kind(**values)


def full_config() -> MedSIGHTConfig:
    """The published model: ViT-L/14-336 QuickGELU, 1024-wide perceiver, Qwen3-8B."""
    return MedSIGHTConfig(name="full")


def tiny_config() -> MedSIGHTConfig:
    """Shapes of the golden parity fixtures: a 56-pixel ViT, a 48-wide perceiver, a 2-layer Qwen3."""
    return MedSIGHTConfig(
        name="tiny",
        vision=VisionConfig(image_size=56, width=48, layers=2, head_width=12, embed_dim=32),
        perceiver=PerceiverConfig(dim=48, heads=4, dim_head=8),
        codebook=CodebookConfig(code_dim=8),
        llm=LLMConfig(
            vocab_size=835,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            bos_token_id=256,
            eos_token_id=258,
            pad_token_id=256,
        ),
    )


PRESETS = {"full": full_config, "tiny": tiny_config}


def get_preset(name: str) -> MedSIGHTConfig:
    """Return a fresh copy of the named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def demo_config() -> MedSIGHTConfig:
    """The CPU demo model (`medsight.demo.train_demo`): a 112-pixel ViT-4x96 trained from scratch (no pretrained
    UniMed-CLIP offline), a 96-wide perceiver with 56x56 masks, 16-d codes and a 3-layer 128-wide Qwen3 on the byte
    tokenizer (vocabulary 259 bytes/specials + 576 region codes).

    Patch 8 (a 14x14 grid) with two perceiver stages rather than patch 14 with three (8x8 grid, 64x64 masks): at
    equal training time it gave the better stage-1 Dice at a lower cost per step; the grid, not the mask size,
    limited thin structures (grey/white matter) and lesions."""
    return MedSIGHTConfig(
        name="demo",
        vision=VisionConfig(image_size=112, patch_size=8, width=96, layers=4, head_width=32, embed_dim=32),
        perceiver=PerceiverConfig(dim=96, num_queries=20, num_stages=2, heads=4, dim_head=32, ff_mult=2,
                                  num_classes=10),
        codebook=CodebookConfig(code_dim=16),
        llm=LLMConfig(
            vocab_size=835,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_sequence_length=1024,
            bos_token_id=256,
            eos_token_id=258,
            pad_token_id=256,
        ),
        code_state_position="at",  # trained by our pipeline, whose losses use the state at the code
    )


PRESETS["demo"] = demo_config
