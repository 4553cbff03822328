"""The ask body's schema refuses a huge body with a handful of errors: the framework turns every validation error
into a dict on the server's event loop, so an error per item held health and cancel for seconds."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from medsight.server.schemas import (
    MAX_JSON_BYTES_PER_TOKEN,
    AskOptions,
    AskRequest,
    SliceSelection,
    max_ask_body_bytes,
)

#: Items in a hostile body: enough that an error per item would cost the event loop noticeably.
ITEMS = 100_000
ASK = {"volume_id": "v", "messages": [{"role": "user", "content": "Where is the liver?"}]}


def _refusal(body: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        AskRequest.model_validate(body)
    return caught.value


def test_unknown_fields_are_one_error_naming_the_first_the_count_and_the_known_ones():
    """Before the fix each unknown field was its own error ("k0: Extra inputs are not permitted", 100,000 times):
    6.7 MB of them held the live server's event loop for 3-4 s."""
    err = _refusal({**ASK, **{f"k{i}": 0 for i in range(ITEMS)}})
    assert err.error_count() == 1
    (error,) = err.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ()
    assert error["msg"] == f"unknown field 'k0' (and {ITEMS - 1} more); known: {', '.join(AskRequest.model_fields)}"


def test_an_unknown_option_names_the_options_there_are():
    (error,) = _refusal({**ASK, "options": {"tempreature": 0.5}}).errors()
    assert error["loc"] == ("options",)
    assert error["msg"] == f"unknown field 'tempreature'; known: {', '.join(AskOptions.model_fields)}"


@pytest.mark.parametrize("row", [[0.0], ["a"]], ids=["numbers", "strings"])
def test_a_view_of_many_rows_is_refused_by_its_length(row):
    """Before the fix every row was read first: 1.1 million rows of a string were 1.1 million errors, and the live
    server took 12-15 s to refuse those 6.7 MB (health waiting all along)."""
    err = _refusal({**ASK, "slices": {"view": [row] * ITEMS}})
    assert err.error_count() == 1
    assert err.errors()[0]["type"] == "too_long" and err.errors()[0]["loc"] == ("slices", "view")


def test_a_view_still_needs_four_rows_of_four_numbers():
    assert SliceSelection.model_validate({"view": [[1.0, 0.0, 0.0, 0.0]] * 4}).view is not None
    for view in ([[0.0] * 4] * 3, [[0.0] * 3] * 4):
        assert "view must be a 4x4 matrix" in str(_refusal({**ASK, "slices": {"view": view}}))
    assert _refusal({**ASK, "slices": {"view": [[0.0] * 5] * 4}}).errors()[0]["type"] == "too_long"


def _json_bytes(token_bytes: bytes) -> int:
    """Bytes that JSON writes for a token's bytes; one that cuts a character (byte-level BPE) at its worst, 3 a byte
    (a 4-byte character is a 12-byte surrogate pair)."""
    try:
        return len(json.dumps(token_bytes.decode("utf-8"))) - 2
    except UnicodeDecodeError:
        return 3 * len(token_bytes)


def test_the_longest_conversation_of_the_published_model_fits_the_ask_body_limit():
    """The ask body limit is the published model's prompt (Qwen3's tokenizer, 2048 embeddings) at the most JSON bytes
    per token: the heaviest of Qwen3's tokens is under that bound, and a conversation filling the prompt with it
    fits the limit, indented."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from medsight.config import full_config
    from medsight.prompt import IMAGE_TOKEN_INDEX, Message, tokenize_prompt
    from medsight_testing.qwen import qwen3_tokenizer

    tokenizer, config = qwen3_tokenizer(), full_config()
    byte_of = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    weights = {}
    for symbol in tokenizer.get_vocab():
        if all(c in byte_of for c in symbol):
            weights[symbol] = _json_bytes(bytes(byte_of[c] for c in symbol))
        else:  # an added token (chat specials, region codes): its text
            weights[symbol] = _json_bytes(symbol.encode())
    heaviest = max(weights, key=weights.get)
    assert MAX_JSON_BYTES_PER_TOKEN >= weights[heaviest] >= MAX_JSON_BYTES_PER_TOKEN * 2 // 3
    text = tokenizer.convert_tokens_to_string([heaviest])
    limit, image = config.llm.max_sequence_length, config.vision.num_patches + config.perceiver.num_queries

    def prompt_length(n: int) -> int:
        ids = tokenize_prompt(tokenizer, [Message("user", "Where?"), Message("assistant", text * n),
                                          Message("user", "And?")])
        return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image - 1)

    n, over = 1, limit  # the most repeats whose prompt fits: between them
    while over - n > 1:
        mid = (n + over) // 2
        n, over = (mid, over) if prompt_length(mid) <= limit else (n, mid)
    body = json.dumps({"volume_id": "0" * 64, "messages": [
        {"role": "user", "content": "Where?"}, {"role": "assistant", "content": text * n},
        {"role": "user", "content": "And?"}], "slices": {"indices": list(range(1024))}}, indent=4)
    assert limit - prompt_length(n) < 4 and len(body) <= max_ask_body_bytes(limit)
