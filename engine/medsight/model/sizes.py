"""Parameter counts and memory needs, computed by building the model on the meta device (no weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsight.config import MedSIGHTConfig
from medsight.model.medsight import MedSIGHTModel


@dataclass(frozen=True)
class ModelSize:
    vision: int
    perceiver: int
    language_model: int

    @property
    def total(self) -> int:
        return self.vision + self.perceiver + self.language_model

    def weight_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.total * torch.empty(0, dtype=dtype).element_size()


def meta_model(config: MedSIGHTConfig) -> MedSIGHTModel:
    with torch.device("meta"):
        return MedSIGHTModel(config)


def model_size(config: MedSIGHTConfig) -> ModelSize:
    model = meta_model(config)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return ModelSize(count(model.image_encoder), count(model.region_perceiver), count(model.language_model))


def kv_cache_bytes_per_token(config: MedSIGHTConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys and values of every layer for one token."""
    llm = config.llm
    per_layer = 2 * llm.num_key_value_heads * llm.head_dim
    return per_layer * llm.num_hidden_layers * torch.empty(0, dtype=dtype).element_size()
