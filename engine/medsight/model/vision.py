"""The UniMed-CLIP image encoder, built from the `open_clip` package (not vendored).

MedSIGHT uses the raw residual stream of one transformer block (before `ln_post`): the CLS token feeds
the stage-2 modality predictor and the patch tokens form the grid that the Region Perceiver reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
from torch import nn

from medsight.config import VisionConfig


def build_vision_encoder(cfg: VisionConfig) -> VisionTransformer:
    """Build only the visual tower of the CLIP model (the text tower is never used)."""
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.width // cfg.head_width,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.embed_dim,
        act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
        norm_layer=LayerNorm,
    )


@dataclass
class VisionFeatures:
    """Features of one batch of model-input images.

    Attributes:
        cls: (B, C) CLS token of the selected block (input of the modality predictor).
        patches: (B, N, C) patch tokens, row-major over the patch grid.
        grid: (B, G, G, C) the same patch tokens as a grid (input of the Region Perceiver).
    """

    cls: torch.Tensor
    patches: torch.Tensor

    @property
    def grid(self) -> torch.Tensor:
        b, n, c = self.patches.shape
        side = round(n**0.5)
        return self.patches.reshape(b, side, side, c)


def encode_image(encoder: VisionTransformer, pixel_values: torch.Tensor, select_layer: int = -1) -> VisionFeatures:
    """Run the encoder up to `select_layer` and return that block's output, CLS split off.

    Args:
        encoder: the open_clip visual tower.
        pixel_values: (B, 3, S, S) normalised model input.
        select_layer: block index, negative from the end (-1 = last block, what the released weights need).
    """
    num_layers = len(encoder.transformer.resblocks)
    if not -num_layers <= select_layer < num_layers:
        raise ValueError(f"select_layer {select_layer} is outside the encoder's {num_layers} blocks")
    index = select_layer % num_layers
    dtype = next(encoder.parameters()).dtype
    out = encoder.forward_intermediates(
        pixel_values.to(dtype),
        indices=[index],
        stop_early=True,
        intermediates_only=True,
        output_fmt="NLC",
        output_extra_tokens=True,
    )
    patches = out["image_intermediates"][0]
    cls = out["image_intermediates_prefix"][0][:, 0]
    return VisionFeatures(cls=cls, patches=patches)
