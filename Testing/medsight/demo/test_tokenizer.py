"""The demo tokenizer: BPE merges learned on the demo corpus, byte tokenizer's prompt format, specials and codes."""

from __future__ import annotations

import json

import pytest
import torch

from medsight.config import tiny_config
from medsight.demo import fill_codes
from medsight.demo.tokenizer import build_demo_tokenizer, corpus, learn_merges
from medsight.model.loading import build_model, load_pretrained, save_pretrained
from medsight.model.tokenizer import CHAT_SPECIAL_TOKENS, build_bpe_tokenizer, build_byte_tokenizer
from medsight.prompt import Message, tokenize_prompt
from medsight.tokens import CodeVocabulary, all_code_names
from medsight_testing.prompts import prompt_text, tokens_per_word


@pytest.fixture(scope="module")
def coded(tiny_demo) -> list[dict]:
    """The tiny training items with region codes in place of the placeholders, as stage 5 reads them."""
    items = json.loads(tiny_demo.lvlm_json["train"].read_text())
    names = {}
    return fill_codes(items, lambda m: names.setdefault(m, f"M{len(names) % 3}_{len(names) % 192}"))


@pytest.fixture(scope="module")
def tokenizer(coded):
    return build_demo_tokenizer(coded)


def _answers(items: list[dict]) -> list[str]:
    return [t["value"] for it in items for t in it["conversations"] if t["from"] == "gpt"]


def test_every_training_answer_word_is_one_or_two_tokens(coded, tokenizer):
    counts = [n for a in _answers(coded) for _, n in tokens_per_word(tokenizer, a)]
    assert len(counts) > 100 and max(counts) <= 2
    # The same measure on the byte tokenizer: one token per letter, which is what let the demo model misspell.
    byte = [n for a in _answers(coded) for w, n in tokens_per_word(build_byte_tokenizer(), a)]
    assert max(byte) >= 8 and sum(byte) > 3 * sum(counts)


def test_merges_are_learned_deterministically(coded):
    texts = list(corpus(coded))
    assert not any("[M" in t or "{code:" in t or "<|im_" in t or "<image>" in t for t in texts)
    assert learn_merges(texts, 64) == learn_merges(texts, 64)
    assert len(learn_merges(texts, 64)) == 64


def test_prompt_specials_and_codes_are_the_byte_tokenizers(coded, tokenizer):
    byte = build_byte_tokenizer()
    assert tokenizer.convert_tokens_to_ids(list(CHAT_SPECIAL_TOKENS)) == [256, 257, 258]
    assert byte.convert_tokens_to_ids(list(CHAT_SPECIAL_TOKENS)) == [256, 257, 258]
    assert (tokenizer.eos_token, tokenizer.pad_token) == (byte.eos_token, byte.pad_token)
    codes = CodeVocabulary.from_tokenizer(tokenizer)  # contiguous block
    assert codes.first_id + codes.num_codes == len(tokenizer) > len(byte)
    names = all_code_names()
    assert tokenizer.convert_ids_to_tokens(list(range(codes.first_id, len(tokenizer)))) == names
    # Same text in, same text out; bytes keep their ids (newline 198, space 220).
    for text in [*_answers(coded)[:40], prompt_text("Please segment the white matter.")]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text == byte.decode(byte(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.convert_tokens_to_ids(["Ċ", "Ġ"]) == [198, 220]
    question = [Message("user", "Segment the brain.")]
    bpe_prompt, byte_prompt = tokenize_prompt(tokenizer, question), tokenize_prompt(byte, question)
    assert bpe_prompt.count(-200) == byte_prompt.count(-200) == 1 and len(bpe_prompt) < len(byte_prompt)
    for special in (256, 257, 258):
        assert bpe_prompt.count(special) == byte_prompt.count(special)


def test_a_merge_of_unknown_symbols_is_refused():
    with pytest.raises(ValueError, match="no earlier merge"):
        build_bpe_tokenizer([("ab", "c")])


def test_save_load_round_trip_through_the_model_loader(tmp_path, coded, tokenizer):
    config = tiny_config()
    config.llm.vocab_size = len(tokenizer)
    model = build_model(config, tokenizer, seed=0)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "m"))
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.codes.first_id == model.codes.first_id == len(tokenizer) - 576
    for text in _answers(coded)[:20]:
        assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    state, back = model.state_dict(), loaded.state_dict()
    assert max((state[k] - back[k]).abs().max().item() for k in state) == 0.0
    assert loaded.language_model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.equal(loaded.language_model.get_input_embeddings().weight,
                       model.language_model.get_input_embeddings().weight)
