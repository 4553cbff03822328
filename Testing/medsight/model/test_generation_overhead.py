"""The generation loop without per-step overhead (no processor-signature inspection, no 2-D mask rebuilt per step
when nothing is padded) computes exactly what Hugging Face `generate` computes: same ids, same states, bit for bit."""

import numpy as np
import pytest
import torch

import medsight
from medsight.model.generation import GenerationOptions, _unpadded_step_mask, generate
from medsight.prompt import Message, tokenize_prompt

QUESTIONS = ["Please segment the white matter.", "Is this CT?", "Where is the liver in this image, please?"]


@pytest.fixture(scope="module")
def tiny():
    return medsight.load_model("tiny", device="cpu")


def inputs(model, count: int):
    rng = np.random.default_rng(4)
    size = model.config.vision.image_size
    encodings = [model.encode(model.prepare(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))[0])
                 for _ in range(count)]
    prompts = [tokenize_prompt(model.tokenizer, [Message("user", q)]) for q in QUESTIONS[:count]]
    with torch.inference_mode():
        embeds = [e for enc in encodings for e in model.image_embeddings(enc)]
        return model.language_model.embed_prompts(prompts, embeds, model.config.llm.max_sequence_length)


@pytest.mark.parametrize("count", [1, 3])  # one slice (no padding: the fast step mask) and a left-padded batch
@torch.inference_mode()
def test_ids_and_states_equal_hugging_face_generate_bit_for_bit(tiny, count):
    embeds, mask = inputs(tiny, count)
    assert (_unpadded_step_mask(tiny.language_model, mask) is not None) == (count == 1)
    eos, new = tiny.config.llm.eos_token_id, 12
    options = GenerationOptions(max_new_tokens=new, min_new_tokens=new)
    ours = generate(tiny.language_model, embeds, mask, eos, options, keep_logits=True)
    hf = tiny.language_model.generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=False, repetition_penalty=1.2, max_new_tokens=new,
        min_new_tokens=new, eos_token_id=eos, pad_token_id=eos, output_hidden_states=True, output_logits=True,
        output_scores=True, return_dict_in_generate=True,
    )
    assert torch.equal(ours.tokens, hf.sequences[:, -new:])
    assert ours.lengths == [new] * count
    hf_states = torch.stack([step[-1][:, -1] for step in hf.hidden_states], dim=1)
    assert torch.equal(ours.states[:, :new], hf_states)
    assert torch.equal(ours.raw_logits, torch.stack(hf.logits, dim=1).float())
    assert torch.equal(ours.scores, torch.stack(hf.scores, dim=1).float())


@torch.inference_mode()
def test_returned_logits_do_not_change_the_answer(tiny):
    """Raw logits are copied only when returned: both ways give the same ids and states."""
    embeds, mask = inputs(tiny, 2)
    options = GenerationOptions(max_new_tokens=10, min_new_tokens=3, hidden_state_position="at")
    kept = generate(tiny.language_model, embeds, mask, tiny.config.llm.eos_token_id, options, keep_logits=True)
    plain = generate(tiny.language_model, embeds, mask, tiny.config.llm.eos_token_id, options)
    assert torch.equal(kept.tokens, plain.tokens) and torch.equal(kept.states, plain.states)
    assert kept.lengths == plain.lengths
