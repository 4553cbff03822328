"""The language-model side reproduces the official prompt, embeddings, logits, generation, captured states and
mask logits (golden lvlm_io.pt), with the model loaded from the official release layout."""

import pytest
import torch
from transformers import LogitsProcessor

from medsight.model.generation import GenerationOptions
from medsight.prompt import Message, tokenize_prompt
from medsight_testing.parity import assert_matches
from medsight_testing.prompts import prompt_text


class ForceTokens(LogitsProcessor):
    """Emit a fixed sequence (the fixture's forced answers), after the official processors ran."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


@pytest.fixture(scope="module")
def encoding(golden_model, lvlm_io):
    # The chatbot rounds pixels to bfloat16; encode() does the same by default.
    return golden_model.encode(lvlm_io["pixel_values_fp32"][None].double())


@pytest.fixture(scope="module")
def prompt(golden_model, lvlm_io):
    return tokenize_prompt(golden_model.tokenizer, [Message("user", lvlm_io["meta"]["question"])])


def run(golden_model, prompt, encoding, **kwargs):
    return golden_model.generate([prompt], [encoding], GenerationOptions(**kwargs), keep_logits=True)


def test_prompt(golden_model, lvlm_io, prompt):
    assert prompt_text(lvlm_io["meta"]["question"]) == lvlm_io["meta"]["prompt_string"]
    assert prompt == lvlm_io["prompt_ids"][0].tolist()


def test_tower_projector_and_merged_embeddings(golden_model, lvlm_io, encoding, prompt):
    tower = torch.cat([encoding.patches, encoding.region_tokens], dim=1)
    assert_matches(tower, lvlm_io["tower_features"], "vision tower output")
    projected = golden_model.image_embeddings(encoding)
    assert_matches(projected, lvlm_io["projected_image_features"], "mm_projector output")
    limit = golden_model.config.llm.max_sequence_length
    embeds, mask = golden_model.language_model.embed_prompts([prompt], list(projected), limit)
    assert_matches(embeds, lvlm_io["inputs_embeds"], "merged input embeddings")
    assert mask.all()


def test_prompt_logits_and_hidden_states(golden_model, lvlm_io):
    with torch.no_grad():
        out = golden_model.language_model(inputs_embeds=lvlm_io["inputs_embeds"], output_hidden_states=True)
    assert_matches(out.logits, lvlm_io["prompt_logits"], "prompt logits")
    states = torch.cat([out.hidden_states[0], out.hidden_states[1], out.hidden_states[-1]])
    assert_matches(states, lvlm_io["prompt_hidden_states"], "prompt hidden states")


def test_forced_answer_states_and_masks(golden_model, lvlm_io, encoding, prompt):
    ref = lvlm_io["forced"]
    options = GenerationOptions(logits_processors=[ForceTokens(ref["forced_ids"].tolist())])
    out = golden_model.generate([prompt], [encoding], options, keep_logits=True)
    assert_matches(out.tokens[0, : out.lengths[0]], ref["sequences"], "forced sequence")
    assert_matches(out.raw_logits[0], ref["raw_logits"], "raw step logits")
    assert_matches(out.states[:, : out.lengths[0]], ref["last_layer_states"], "last-layer states")
    where, states = golden_model.code_states(out, 0, options)
    assert where == ref["code_new_token_index"].tolist()
    assert_matches(states, ref["seg_embeddings"], "states used for decoding (official: before the code)")
    assert_matches(golden_model.language_model.token_projection(states), ref["region_codes"], "token_projection")
    logits = golden_model.decode_regions(encoding.grid, [states])[0]
    assert_matches(logits[None], ref["mask_logits"], "mask logits")


def test_training_convention_uses_states_at_the_codes(golden_model, lvlm_io, encoding, prompt):
    ref = lvlm_io["train"]
    forced = lvlm_io["forced"]["forced_ids"].tolist()
    options = GenerationOptions(logits_processors=[ForceTokens(forced)], hidden_state_position="at")
    out = golden_model.generate([prompt], [encoding], options)
    _, states = golden_model.code_states(out, 0, options)
    assert_matches(states, ref["seg_embeddings"], "states at the codes")
    assert_matches(golden_model.decode_regions(encoding.grid, [states])[0][None], ref["mask_logits"], "train masks")


def test_no_code_fallback_is_a_switch(golden_model, lvlm_io, encoding, prompt):
    ref = lvlm_io["forced_nocode"]
    force = ForceTokens(ref["forced_ids"].tolist())
    official = GenerationOptions(logits_processors=[force], no_code_fallback=True)
    out = golden_model.generate([prompt], [encoding], official)
    assert_matches(out.tokens[0, : out.lengths[0]], ref["sequences"], "no-code sequence")
    where, states = golden_model.code_states(out, 0, official)
    assert where == []
    assert_matches(states, ref["seg_embeddings"], "fallback state (end of prompt)")
    assert_matches(golden_model.decode_regions(encoding.grid, [states])[0][None], ref["mask_logits"], "fallback mask")
    _, none = golden_model.code_states(out, 0, GenerationOptions())
    assert none.shape[0] == 0, "by default no code means no mask"


def test_free_greedy_generation(golden_model, lvlm_io, encoding, prompt):
    ref = lvlm_io["free"]
    steps = len(ref["sequences"])  # the official run stopped at its max_new_tokens
    out = run(golden_model, prompt, encoding, max_new_tokens=steps)
    assert_matches(out.tokens[0], ref["sequences"], "greedy tokens")
    assert_matches(out.raw_logits[0], ref["raw_logits"], "raw logits")
    assert_matches(out.scores[0], ref["processed_scores"], "processed scores (penalty, min-new-tokens)")
    assert_matches(out.states[:, :steps], ref["last_layer_states"], "states")
    options = GenerationOptions(max_new_tokens=steps)
    where, states = golden_model.code_states(out, 0, options)
    assert where == ref["code_new_token_index"].tolist()
    assert_matches(states, ref["seg_embeddings"], "code states")
    assert_matches(golden_model.decode_regions(encoding.grid, [states])[0][None], ref["mask_logits"], "masks")
    text = golden_model.tokenizer.decode(out.tokens[0].tolist(), skip_special_tokens=True)
    assert text == ref["answer_text"]


def test_float32_run_within_the_float32_tolerance(golden_model, lvlm_io, perceiver_io, prompt):
    """float32 throughout: <= 1e-4 * max|ref| + 1e-6 per tensor, identical tokens."""
    import copy

    model = copy.deepcopy(golden_model).float()
    ref = lvlm_io["forced"]
    encoding = model.encode(lvlm_io["pixel_values_fp32"][None])
    assert_matches(torch.cat([encoding.patches, encoding.region_tokens], 1).float(), lvlm_io["tower_features"].float(),
                   "float32 tower")
    options = GenerationOptions(logits_processors=[ForceTokens(ref["forced_ids"].tolist())])
    out = model.generate([prompt], [encoding], options)
    _, states = model.code_states(out, 0, options)
    masks = model.decode_regions(encoding.grid, [states])[0][None]
    assert_matches(masks, ref["mask_logits"].float(), "float32 mask logits")
    free = model.generate([prompt], [encoding], GenerationOptions(max_new_tokens=len(lvlm_io["free"]["sequences"])))
    assert free.tokens[0].tolist() == lvlm_io["free"]["sequences"].tolist()
    seg = model.region_perceiver(perceiver_io["perceiver"]["grid_in"].float()).seg_logits
    assert_matches(seg, perceiver_io["perceiver"]["seg_logits"].float(), "float32 perceiver seg logits")
