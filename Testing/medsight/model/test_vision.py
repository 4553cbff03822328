"""The open_clip image encoder reproduces the official ViT features (golden perceiver_io.pt)."""

import pytest
import torch

from medsight.model.vision import encode_image
from medsight_testing.parity import assert_matches


def test_block_outputs_match_golden(golden_model, perceiver_io):
    pixels = perceiver_io["pixel_values"][None].double()
    feats = encode_image(golden_model.image_encoder, pixels, select_layer=-1)
    assert_matches(feats.patches, perceiver_io["regtok_patch_features"], "patch features (block -1)")
    assert_matches(feats.cls, perceiver_io["vit"]["block_outputs"][-1][:, 0], "CLS of block -1")
    assert_matches(feats.grid, perceiver_io["perceiver"]["grid_in"], "perceiver input grid")


def test_select_layer_minus_two_is_the_previous_block(golden_model, perceiver_io):
    pixels = perceiver_io["pixel_values"][None].double()
    feats = encode_image(golden_model.image_encoder, pixels, select_layer=-2)
    assert_matches(feats.patches, perceiver_io["vit"]["block_outputs"][-2][:, 1:], "block -2 patches")


def test_batch_of_two(golden_model, perceiver_io):
    batch = perceiver_io["batch2"]
    feats = encode_image(golden_model.image_encoder, batch["pixel_values"], select_layer=-1)
    assert_matches(feats.patches, batch["patch_features"], "batch2 patch features")


def test_select_layer_out_of_range_is_rejected(golden_model, perceiver_io):
    blocks = len(perceiver_io["vit"]["block_outputs"])
    pixels = torch.zeros_like(perceiver_io["pixel_values"][None], dtype=torch.float64)
    for layer in (blocks, -blocks - 1):
        with pytest.raises(ValueError, match=f"select_layer {layer} is outside the encoder's {blocks} blocks"):
            encode_image(golden_model.image_encoder, pixels, select_layer=layer)
