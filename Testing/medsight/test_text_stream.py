"""The streamed text of a generated row (`_TextStream`, behind `Engine.ask(on_token=...)`): the same deltas as
re-decoding the whole row at every token, at a cost that grows linearly with the row's length."""

from __future__ import annotations

import copy
import random

import pytest
from tokenizers import decoders
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from medsight.demo.tokenizer import learn_merges
from medsight.engine import _TextStream
from medsight.model.loading import EMBEDDED
from medsight.model.tokenizer import build_bpe_tokenizer, build_byte_tokenizer, load_tokenizer
from medsight.prompt import ASSISTANT_PREFIX, strip_assistant_prefix
from medsight_testing.qwen import qwen3_tokenizer

TEXTS = [
    "assistant\nThe liver is segmented as [M0_3] and the left kidney as [M1_2].",
    "  assistant\nÜberprüfung: Leber 肝臓, Niere 腎臓 🫁🧠 — ok.",
    "assistant\n\ufffd is a real replacement character, not a cut one \ufffd",
    "assist",
    "assistant\nSpaces before punctuation , which a clean-up pass removes . Don 't .",
    "No header here: é, ß, 🫀, 日本語.<|im_end|>",
    "<|im_start|>assistant\nSegmented [M17_31].<|im_end|>\n<|endoftext|>",
]


def build(name: str):
    if name == "byte":
        return build_byte_tokenizer()
    if name == "demo":  # the tokenizer the embedded demo model ships
        return load_tokenizer(EMBEDDED["demo"])
    if name == "bpe":  # a demo tokenizer with merges, as `medsight.demo.tokenizer` learns them
        return build_bpe_tokenizer(learn_merges([t for t in TEXTS for _ in range(20)], num_merges=64))
    if name == "cleanup":  # transformers' clean-up pass rewrites text across tokens: the stream re-decodes rows
        tokenizer = build_byte_tokenizer()
        tokenizer.clean_up_tokenization_spaces = True
        return tokenizer
    return qwen3_tokenizer()


@pytest.fixture(scope="module", params=["byte", "demo", "bpe", "qwen3", "cleanup"])
def tokenizer(request):
    return build(request.param)


def redecoded_deltas(tokenizer, ids: list[int]) -> list[str]:
    """The reference: decode the whole row at every token, hold back the header and cut characters."""
    emitted, deltas = "", []
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        visible = strip_assistant_prefix(text)
        if text.endswith("\ufffd") or ASSISTANT_PREFIX.startswith(text.lstrip()) or not visible.startswith(emitted):
            deltas.append("")
            continue
        deltas.append(visible[len(emitted):])
        emitted = visible
    return deltas


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so that every multi-byte character is split across tokens."""
    symbols = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([symbols[b] for b in text.encode()])


def sequences(tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    vocab = len(tokenizer)
    specials = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    out = []
    for text in TEXTS:
        for ids in (tokenizer(text, add_special_tokens=False)["input_ids"], byte_ids(tokenizer, text)):
            out.append(ids)
            for _ in range(5):  # random tokens and specials spliced in
                spliced = list(ids)
                for _ in range(rng.randint(1, 4)):
                    spliced.insert(rng.randrange(len(spliced) + 1), rng.choice([rng.randrange(vocab), *specials]))
                out.append(spliced)
    for _ in range(150):  # random rows: invalid and cut UTF-8, specials, codes
        out.append([rng.randrange(vocab) for _ in range(rng.randint(1, 60))])
    return out


def test_deltas_match_redecoding_the_row(tokenizer):
    rows = sequences(tokenizer)
    split = sum(any(not d.isascii() for d in redecoded_deltas(tokenizer, ids)) for ids in rows)
    assert split > 0  # multi-byte characters did get assembled from several tokens
    for ids in rows:
        stream = _TextStream(tokenizer)
        deltas = [stream.push(i) for i in ids]
        assert deltas == redecoded_deltas(tokenizer, ids), ids
        if tokenizer.clean_up_tokenization_spaces:
            continue  # its clean-up rewrites text already sent (" ," becomes ","): the stream never contradicts it
        final = strip_assistant_prefix(tokenizer.decode(ids, skip_special_tokens=True))
        assert "".join(deltas) + stream.flush(final) == final, ids


class CountingDecoder:
    """Wraps a decoder and counts the tokens it is asked to decode."""

    def __init__(self, inner) -> None:
        self.inner, self.tokens = inner, 0

    def decode_chain(self, tokens: list[str]) -> list[str]:
        self.tokens += len(tokens)
        return [self.inner.decode(tokens)]


@pytest.mark.parametrize("name", ["byte", "qwen3"])
def test_cost_grows_linearly_with_the_row(name):
    tokenizer = copy.deepcopy(build(name))
    counter = CountingDecoder(tokenizer.backend_tokenizer.decoder)
    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(counter)
    text = " ".join(TEXTS[:3])
    per_token = []
    for repeats in (4, 16):
        ids = tokenizer(text * repeats, add_special_tokens=False)["input_ids"]
        counter.tokens = 0
        stream = _TextStream(tokenizer)
        streamed = "".join(stream.push(i) for i in ids)
        final = strip_assistant_prefix(tokenizer.decode(ids, skip_special_tokens=True))
        assert len(streamed) > len(final) / 2 and streamed + stream.flush(final) == final
        per_token.append(counter.tokens / len(ids))
    # Re-decoding the row at every token decodes about n/2 tokens per token (n: the row's length, hundreds here).
    assert per_token[1] < 8, per_token
    assert per_token[1] <= per_token[0] * 1.1, per_token
