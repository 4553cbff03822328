"""Region-code ids and the prompt, with the real Qwen3 tokenizer (test-only dependency)."""

import logging

import pytest

from medsight.model.lvlm import IMAGE_TOKEN_INDEX
from medsight.prompt import Message, render_messages, strip_assistant_prefix, tokenize_prompt
from medsight.tokens import CodeVocabulary, parse_code_labels
from medsight_testing.prompts import prompt_text
from medsight_testing.qwen import qwen3_tokenizer

SPEC_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nPlease segment the kidney.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return qwen3_tokenizer()


def test_code_ids_with_the_real_tokenizer(qwen_tokenizer):
    codes = CodeVocabulary.from_tokenizer(qwen_tokenizer)
    assert qwen_tokenizer.convert_tokens_to_ids("[M0_0]") == 151_669
    assert qwen_tokenizer.convert_tokens_to_ids("[M17_31]") == 152_244
    assert codes.id_of(2, 11) == 151_669 + 32 * 2 + 11
    assert codes.name_of(152_244) == "[M17_31]"
    assert len(qwen_tokenizer) == 152_245


def test_prompt_matches_the_spec_byte_for_byte(qwen_tokenizer):
    assert prompt_text("Please segment the kidney.") == SPEC_PROMPT
    ids = tokenize_prompt(qwen_tokenizer, [Message("user", "Please segment the kidney.")])
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids[0] == 151_644  # <|im_start|>
    text = "".join("<image>" if i == IMAGE_TOKEN_INDEX else qwen_tokenizer.decode([i]) for i in ids)
    assert text == SPEC_PROMPT
    # About 14 text tokens come before the image, as the spec says for Qwen.
    assert 12 <= ids.index(IMAGE_TOKEN_INDEX) <= 16


def test_codes_are_single_tokens_kept_when_decoding(qwen_tokenizer):
    ids = qwen_tokenizer("Kidney segmented as [M0_21].", add_special_tokens=False)["input_ids"]
    assert 151_669 + 21 in ids
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "Kidney segmented as [M0_21]."


def test_image_placeholders_and_roles():
    turns = render_messages([Message("human", "<image>What is this?"), Message("gpt", "A CT."),
                             Message("user", "Segment the liver.")], num_images=2)
    assert turns[1] == "<|im_start|>user\n<image>\n<image>\nWhat is this?<|im_end|>\n"
    assert turns[2] == "<|im_start|>assistant\nA CT.<|im_end|>\n"
    assert "<image>" not in turns[3]
    with pytest.raises(ValueError, match="unknown message role 'robot'"):
        render_messages([Message("robot", "hi")])
    with pytest.raises(ValueError, match="no user message"):
        render_messages([Message("system", "x")])


def test_answer_prefix_and_labels():
    assert strip_assistant_prefix("assistant\nSpleen segmented as [M0_7].") == "Spleen segmented as [M0_7]."
    assert parse_code_labels("Kidney [M0_21], liver [M2_11].") == [("[M0_21]", "Kidney"), ("[M2_11]", "liver")]
    assert parse_code_labels("The abnormality identified is a malignant tumor, segmented as [M2_11].") == [
        ("[M2_11]", "malignant tumor")
    ]
    assert parse_code_labels(
        "Findings consistent with a brain tumor (including enhancing components) are present; segmented as [M10_3]."
    ) == [("[M10_3]", "brain tumor")]
    labels = parse_code_labels(
        "Liver [M0_16], spleen [M0_7], stomach [M0_8], aorta [M0_1], and postcava [M0_28] are segmented."
    )
    assert [label for _, label in labels] == ["Liver", "spleen", "stomach", "aorta", "postcava"]
    assert parse_code_labels("[M2_14][M2_12]") == [("[M2_14]", ""), ("[M2_12]", "")]



class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_too_long_question_gives_no_tokenizer_warning():
    """`medsight ask` with a very long question printed transformers' "Token indices sequence length is longer than
    the specified maximum sequence length for this model (6005 > 2048)" before the Engine's own one-line error
    (which names the model's real limit)."""
    tokenizer = qwen3_tokenizer()  # fresh: transformers warns once per tokenizer
    question = "segment the liver " * tokenizer.model_max_length
    records = _Records()
    transformers_log = logging.getLogger("transformers")  # it does not propagate to the root logger
    transformers_log.addHandler(records)
    try:
        ids = tokenize_prompt(tokenizer, [Message("user", question)])
    finally:
        transformers_log.removeHandler(records)
    assert len(ids) > tokenizer.model_max_length
    assert not [m for m in records.messages if "Token indices sequence length" in m], records.messages
