"""Configs are data: presets round-trip through JSON and bad values are refused with a reason."""

import pytest
import torch

from medsight.config import MedSIGHTConfig, get_preset
from medsight.model.perceiver import RegionPerceiver


@pytest.mark.parametrize("name", ["full", "tiny", "demo"])
def test_presets_round_trip_through_json(name, tmp_path):
    config = get_preset(name)
    config.to_json(tmp_path / "c.json")
    assert MedSIGHTConfig.from_json(tmp_path / "c.json") == config
    assert MedSIGHTConfig.from_json(config.to_json()) == config


def test_full_preset_has_the_paper_sizes():
    c = get_preset("full")
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers) == (336, 14, 1024, 24)
    assert c.vision.grid_size == 24 and c.vision.select_layer == -1 and c.vision.quick_gelu
    assert (c.perceiver.dim, c.perceiver.num_queries, c.perceiver.num_stages, c.perceiver.heads,
            c.perceiver.dim_head) == (1024, 20, 3, 8, 64)
    assert (c.codebook.num_modalities, c.codebook.codebook_size, c.codebook.code_dim) == (18, 32, 64)
    assert c.llm.vocab_size == 151_669 + 576 and c.llm.first_code_id == 151_669


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
    data = get_preset("tiny").to_dict()
    data["vision"]["colour"] = 1
    with pytest.raises(ValueError, match="unknown field\\(s\\) in config section 'vision': colour"):
        MedSIGHTConfig.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["perceiver"]["dim"] = 64
    with pytest.raises(ValueError, match=r"vision\.width \(48\) must equal perceiver\.dim \(64\)"):
        MedSIGHTConfig.from_dict(data)
    data = get_preset("tiny").to_dict()
    data["code_state_position"] = "after"
    with pytest.raises(ValueError, match="code_state_position must be 'before' or 'at', not 'after'"):
        MedSIGHTConfig.from_dict(data)


def test_code_state_position_official_by_default_and_at_for_our_demo_model():
    assert get_preset("full").code_state_position == get_preset("tiny").code_state_position == "before"
    assert get_preset("demo").code_state_position == "at"
    legacy = get_preset("demo").to_dict()
    del legacy["code_state_position"]  # configs written before the field existed
    assert MedSIGHTConfig.from_dict(legacy).code_state_position == "before"


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_mask_size_is_what_the_perceiver_outputs(name):
    cfg = get_preset(name)
    grid = torch.randn(1, cfg.vision.grid_size, cfg.vision.grid_size, cfg.perceiver.dim)
    with torch.no_grad():
        logits = RegionPerceiver(cfg.perceiver).eval()(grid).seg_logits
    assert tuple(logits.shape[-2:]) == (cfg.mask_size, cfg.mask_size)
