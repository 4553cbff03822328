"""`ask` end to end on the tiny model, and batching that never changes an answer."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

import medsight
from medsight.model.generation import GenerationOptions
from medsight.model.medsight import groups_by_count
from medsight.prompt import Message, tokenize_prompt


class ForceText(LogitsProcessor):
    def __init__(self, ids):
        self.ids = ids

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(input_ids.shape[1], len(self.ids) - 1)]] = 0
        return out


@pytest.fixture(scope="module")
def tiny():
    return medsight.load_model("tiny", device="cpu", dtype=torch.float64)


def test_ask_returns_masks_on_the_image_grid(tiny):
    image = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    text = "assistant\nLiver [M0_16], spleen [M0_7]."
    ids = [257, *tiny.tokenizer(text, add_special_tokens=False)["input_ids"], 258]
    options = GenerationOptions(logits_processors=[ForceText(ids)])
    answer = tiny.ask(image, "Please segment the liver and spleen.", options)
    assert answer.text == "Liver [M0_16], spleen [M0_7]."
    assert [(r.code, r.label) for r in answer.regions] == [("[M0_16]", "Liver"), ("[M0_7]", "spleen")]
    for region in answer.regions:
        assert region.mask.shape == (70, 50) and region.mask.dtype == bool
        assert region.mask_logits.shape == (32, 32)
        assert region.modality == 0
        if region.mask.any():
            r0, c0, r1, c1 = region.bbox
            assert region.mask[r0 : r1 + 1, c0 : c1 + 1].sum() == region.mask.sum()
            assert 0.5 < region.probability <= 1.0


def test_no_code_means_no_mask_unless_the_official_fallback_is_on(tiny):
    image = np.zeros((56, 56), dtype=np.uint8)
    ids = [257] + tiny.tokenizer("assistant\nNo.", add_special_tokens=False)["input_ids"] + [258]
    answer = tiny.ask(image, "Is there a tumour?", GenerationOptions(logits_processors=[ForceText(ids)]))
    assert answer.text == "No." and answer.regions == []
    official = GenerationOptions(logits_processors=[ForceText(ids)], no_code_fallback=True)
    regions = tiny.ask(image, "Is there a tumour?", official).regions
    assert len(regions) == 1 and regions[0].code is None


def test_batched_generation_equals_one_by_one(tiny):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["Segment the kidney.", "Is this CT or MRI? Answer in one word please.", "Where?"]
    encodings = [tiny.encode(tiny.prepare(im)[0]) for im in images]
    prompts = [tokenize_prompt(tiny.tokenizer, [Message("user", q)]) for q in questions]
    options = GenerationOptions(max_new_tokens=10)
    batched = tiny.generate(prompts, encodings, options)
    for i in range(3):
        single = tiny.generate([prompts[i]], [encodings[i]], options)
        n = single.lengths[0]
        assert batched.lengths[i] == n
        assert torch.equal(batched.tokens[i, :n], single.tokens[0, :n])
        _, s_states = tiny.code_states(single, 0, options)
        _, b_states = tiny.code_states(batched, i, options)
        if s_states.shape[0]:
            s_masks = tiny.decode_regions(encodings[i].grid, [s_states])[0]
            grids = torch.cat([e.grid for e in encodings])
            b_masks = tiny.decode_regions(grids, [b_states if j == i else b_states[:0] for j in range(3)])[i]
            assert float((s_masks - b_masks).abs().max()) <= 1e-5


def test_decode_regions_with_mixed_code_counts_equals_each_sample_alone(tiny):
    """Samples are grouped by code count: every sample's masks are the ones it gets decoded on its own."""
    gen = torch.Generator().manual_seed(11)
    grids = tiny.encode(torch.randn(5, 3, 56, 56, generator=gen)).grid
    hidden = tiny.config.llm.hidden_size
    counts = [2, 0, 3, 2, 1]
    states = [torch.randn(k, hidden, generator=gen, dtype=grids.dtype) for k in counts]
    assert groups_by_count(states) == [[0, 3], [2], [4]]
    batched = tiny.decode_regions(grids, states)
    size = tiny.config.mask_size
    for i, k in enumerate(counts):
        if k == 0:
            assert batched[i].numel() == 0
            continue
        alone = tiny.decode_regions(grids[i : i + 1], [states[i]])[0]
        assert tuple(batched[i].shape) == (k, size, size)
        assert float((batched[i] - alone).abs().max()) <= 1e-5


def test_sampling_is_reproducible_with_a_seed(tiny):
    image = np.zeros((56, 56, 3), dtype=np.uint8)
    options = GenerationOptions(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, seed=3, max_new_tokens=8)
    assert tiny.ask(image, "Describe.", options).token_ids == tiny.ask(image, "Describe.", options).token_ids


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="hidden_state_position must be 'before'"):
        GenerationOptions(hidden_state_position="after")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationOptions(temperature=0)


def test_unset_state_position_follows_the_model_config(tiny):
    """Options without a position decode from the model's own `code_state_position`; explicit options win."""
    image = np.random.default_rng(2).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    ids = [257, *tiny.tokenizer("assistant\nLiver [M0_16] and more.", add_special_tokens=False)["input_ids"], 258]

    def logits(position):
        options = GenerationOptions(logits_processors=[ForceText(ids)], hidden_state_position=position)
        return tiny.ask(image, "Segment the liver.", options).regions[0].mask_logits

    assert tiny.config.code_state_position == "before"  # the official default
    before, at, unset = logits("before"), logits("at"), logits(None)
    assert np.abs(np.asarray(before) - np.asarray(at)).max() > 1e-6  # the two states really differ
    assert np.array_equal(unset, before)
    tiny.config.code_state_position = "at"
    try:
        assert np.array_equal(logits(None), at)
        assert np.array_equal(logits("before"), before)
    finally:
        tiny.config.code_state_position = "before"


def test_model_ask_is_the_engine_path(tiny):
    """`MedSIGHTModel.ask` runs `Engine.ask`: the same answer type and identical answers, by construction."""
    from medsight.engine import Engine

    image = np.random.default_rng(4).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    ids = [257, *tiny.tokenizer("assistant\nLiver [M0_16], spleen [M0_7].", add_special_tokens=False)["input_ids"], 258]
    options = GenerationOptions(logits_processors=[ForceText(ids)])
    alone = tiny.ask(image, "Segment the liver and spleen.", options)
    engine = Engine(tiny).ask([image], "Segment the liver and spleen.", options)[0]
    assert type(alone) is type(engine)
    assert (alone.text, alone.token_ids) == (engine.text, engine.token_ids)
    assert len(alone.regions) == len(engine.regions) == 2
    for a, b in zip(alone.regions, engine.regions, strict=True):
        assert (a.code, a.label, a.bbox) == (b.code, b.label, b.bbox)
        assert np.array_equal(a.mask, b.mask)
