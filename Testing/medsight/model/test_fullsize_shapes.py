"""The `full` preset has exactly the released parameter names and shapes (golden fullsize_shapes_*.json)."""

import json
import math

import pytest

from medsight.config import get_preset
from medsight.model.sizes import kv_cache_bytes_per_token, meta_model, model_size


@pytest.fixture(scope="module")
def full_model():
    return meta_model(get_preset("full"))


def shapes(module, prefix=""):
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def test_regtok_keys_and_shapes(full_model, golden):
    expected = json.loads((golden / "fullsize_shapes_stage1.json").read_text())
    ours = shapes(full_model.image_encoder, "image_encoder.")
    ours.update(shapes(full_model.region_perceiver, "region_perceiver."))
    assert ours == expected


def test_lvlm_keys_shapes_and_counts(full_model, golden):
    table = json.loads((golden / "fullsize_shapes_lvlm.json").read_text())
    expected = dict(table["all_parameters"])
    assert shapes(full_model.language_model) == expected
    counts = dict(table["parameter_counts"])
    assert model_size(get_preset("full")).language_model == counts["total_RegSegForCausalLM_without_vision_tower"]
    first, last = dict(table["region_code_token_rows"])["first_id"], dict(table["region_code_token_rows"])["last_id"]
    assert (full_model.codes.first_id, full_model.codes.first_id + full_model.codes.num_codes - 1) == (first, last)


def test_stage2_keys_and_shapes(full_model, golden):
    expected = json.loads((golden / "fullsize_shapes_stage2_trainable.json").read_text())
    book = full_model.attach_codebook() if full_model.codebook is None else full_model.codebook
    renamed = {}
    for key, shape in shapes(book).items():
        if key.startswith("codebooks."):
            key = "quantizer." + key
        elif key.startswith("to_code."):
            key = "region_perceiver." + key
        elif key.startswith(("from_code.", "segmentation_cls_head_quant.")):
            key = "region_perceiver.code_decoder." + key
        renamed[key] = shape
    assert renamed == expected


def test_memory_figures_follow_from_the_counts(golden):
    size = model_size(get_preset("full"))
    stage1 = json.loads((golden / "fullsize_shapes_stage1.json").read_text())
    assert size.perceiver == sum(math.prod(s) for k, s in stage1.items() if k.startswith("region_perceiver."))
    assert size.weight_bytes() == 2 * size.total
    # Layers x (K + V) x the k_proj output width x 2 bytes (bfloat16).
    lvlm = dict(json.loads((golden / "fullsize_shapes_lvlm.json").read_text())["all_parameters"])
    layers = len({k.split(".")[2] for k in lvlm if k.startswith("model.layers.")})
    kv_width = lvlm["model.layers.0.self_attn.k_proj.weight"][0]
    assert kv_cache_bytes_per_token(get_preset("full")) == layers * 2 * kv_width * 2
