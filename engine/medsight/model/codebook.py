"""The stage-2 modality-aware region codebook.

A region query is mapped to a 64-d code space (`to_code`, W_q), snapped to the nearest of 32 unit-norm codes
of its modality's codebook, and mapped back (`from_code`, W_m) for a second segmentation head. The codebook
gives each region its `[M{m}_{k}]` token name; at inference the LVLM never reads the code vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config import CodebookConfig, PerceiverConfig
from medsight.model.perceiver import SegmentationHead


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm -> Linear -> GELU -> LayerNorm (indices 0..5 as in the checkpoint).

    The hidden width is the perceiver width, whichever side it is on.
    """
    hidden = max(d_in, d_out)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden),
        nn.Linear(hidden, d_out), nn.GELU(), nn.LayerNorm(d_out),
    )


class ModalityCodebook(nn.Module):
    """One codebook: `n` learnable codes, compared by cosine (both sides L2-normalised)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (..., c) -> (indices (...), unit codes (..., c), distances (..., n))."""
        zf = F.normalize(z, p=2, dim=-1)
        codes = F.normalize(self.embedding.weight, p=2, dim=-1).to(z.dtype)
        flat = zf.reshape(-1, zf.shape[-1])
        dist = (
            flat.pow(2).sum(dim=1, keepdim=True)
            + codes.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, codes.t())
        )
        indices = dist.argmin(dim=1)
        shape = z.shape[:-1]
        return indices.view(shape), codes[indices].view(*shape, -1), dist.view(*shape, -1)


@dataclass
class Quantized:
    """Result of quantising one sample's region queries."""

    modality: int
    indices: torch.Tensor  # (N,)
    z: torch.Tensor  # (N, c) un-normalised to_code output
    z_q: torch.Tensor  # (N, c) selected unit codes (the forward value)
    decoded: torch.Tensor  # (N, d) from_code(z_q)

    def token_names(self) -> list[str]:
        return [f"[M{self.modality}_{int(k)}]" for k in self.indices]


class RegionCodebook(nn.Module):
    """W_q, 18 modality codebooks, W_m, the quantised head and the CLS modality predictor."""

    def __init__(self, cfg: CodebookConfig, perceiver: PerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, c = perceiver.dim, cfg.code_dim
        self.to_code = _mlp(d, c)
        self.from_code = _mlp(c, d)
        self.codebooks = nn.ModuleDict(
            {str(m): ModalityCodebook(cfg.codebook_size, c) for m in range(cfg.num_modalities)}
        )
        self.segmentation_cls_head_quant = SegmentationHead(d, perceiver.num_classes)
        self.modality_predictor = nn.Linear(d, cfg.num_modalities)

    def predict_modality(self, cls_token: torch.Tensor) -> torch.Tensor:
        """(B, d) CLS tokens of the selected ViT block -> (B,) predicted modality labels."""
        return self.modality_predictor(cls_token).argmax(dim=-1)

    def codebook_for(self, modality: int | str) -> ModalityCodebook:
        # The official router falls back to codebook "0" for a key it does not know.
        return self.codebooks[str(modality)] if str(modality) in self.codebooks else self.codebooks["0"]

    def quantize(self, queries: torch.Tensor, modality: int | str, warmup_doubling: bool = False) -> Quantized:
        """Quantise one sample's (N, d) region queries with the codebook of `modality`.

        Args:
            warmup_doubling: reproduce the official training warm-up, whose forward value is twice the code.
        """
        book = self.codebook_for(modality)
        z = self.to_code(queries)
        indices, z_q, _ = book.nearest(z)
        if warmup_doubling:
            z_q = 2 * z_q
        key = int(modality) if str(modality) in self.codebooks else 0
        return Quantized(key, indices, z, z_q, self.from_code(z_q))

    def quantized_head(self, decoded: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and classes of the quantised route on the last multi-scale features."""
        return self.segmentation_cls_head_quant(decoded, features)
