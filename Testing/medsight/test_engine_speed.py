"""Speed levers of the Engine: exact ones change no id and no mask bit; the approximate bf16 mask decoding is a named
option that leaves the text exact and moves mask logits only within its documented error."""

import numpy as np
import pytest
import torch

import medsight
import medsight.engine as engine_module
from medsight.engine import VolumeSlices
from medsight.model.perceiver import RegionPerceiver

QUESTION = "Please segment the white matter."


@pytest.fixture(scope="module")
def mni():
    from nilearn.datasets import load_mni152_template

    from medsight.imaging import Volume

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    return Volume(data, spacing=(2.0, 2.0, 2.0), modality="MR")


def masks(answer) -> list[torch.Tensor]:
    return [region.mask_logits for slice_answer in answer for region in slice_answer.regions]


def test_one_slice_ask_shares_grid_features_without_changing_a_bit(mni, monkeypatch):
    """Encode computes the perceiver's query-independent start once and decode reuses it: one `grid_features` call
    per ask instead of two, and the same ids, text and mask logits as recomputing it."""
    engine = medsight.Engine.load("tiny", device="cpu")
    options = medsight.GenerationOptions(max_new_tokens=12, min_new_tokens=12, no_code_fallback=True)
    request = VolumeSlices(mni, "axial", [mni.array.shape[0] // 2])
    calls = []
    original = RegionPerceiver.grid_features

    def counted(self, grid):
        calls.append(grid.shape[0])
        return original(self, grid)

    monkeypatch.setattr(RegionPerceiver, "grid_features", counted)
    shared = engine.ask(request, QUESTION, options)
    assert calls == [1]
    monkeypatch.setattr(engine_module, "KEPT_GRID_FEATURES_BYTES", 0)  # too big to keep: decode recomputes it
    engine.clear_cache()
    recomputed = engine.ask(request, QUESTION, options)
    assert calls == [1, 1, 1]
    assert shared[0].token_ids == recomputed[0].token_ids and shared[0].text == recomputed[0].text
    assert len(masks(shared)) == len(masks(recomputed)) >= 1
    for a, b in zip(masks(shared), masks(recomputed), strict=True):
        assert torch.equal(a, b)


def test_bf16_mask_decoding_keeps_the_text_and_moves_masks_within_its_error(mni):
    indices = [mni.array.shape[0] // 2 - 6, mni.array.shape[0] // 2 + 6]
    request = VolumeSlices(mni, "axial", indices)
    options = medsight.GenerationOptions(max_new_tokens=24, no_code_fallback=True)
    exact = medsight.Engine.load("demo", device="cpu").ask(request, QUESTION, options)
    fast = medsight.Engine.load("demo", device="cpu", mask_decode_dtype=torch.bfloat16).ask(request, QUESTION, options)
    for a, b in zip(exact, fast, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
    pairs = list(zip(masks(exact), masks(fast), strict=True))
    assert pairs
    worst = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    agree = min(float(((a > 0) == (b > 0)).float().mean()) for a, b in pairs)
    assert 0 < worst <= 1.0  # really decoded in bf16, within the README's stated error
    assert agree >= 0.99
