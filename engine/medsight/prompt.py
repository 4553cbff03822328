"""The official prompt: bare ChatML, no generation header, `<image>\\n` at the start of the first user turn.

Each message is tokenized on its own and the ids concatenated, as the official code does. The `<image>` text
becomes the single id IMAGE_TOKEN_INDEX, which the model replaces by the image embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medsight.model.lvlm import IMAGE_TOKEN_INDEX

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
ASSISTANT_PREFIX = "assistant\n"
ASSISTANT_HEADER = "<|im_start|>" + ASSISTANT_PREFIX  # opens every assistant turn
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Message:
    """One chat turn. `role` is user, assistant or system (the official data's human/gpt also work)."""

    role: str
    content: str


def questions_of(messages: Sequence[Message]) -> list[str]:
    """The user turns' texts (a "human" turn of the official data is one), in order."""
    return [m.content for m in messages if _ROLES.get(m.role) == "user"]


def check_roles(messages: Sequence[Message]) -> None:
    """Refuse a message whose role is none of user, assistant or system (or the official data's human/gpt)."""
    bad = [m.role for m in messages if m.role not in _ROLES]
    if bad:
        raise ValueError(f"unknown message role {bad[0]!r}; use user, assistant or system")


def render_messages(messages: Sequence[Message], num_images: int = 1) -> list[str]:
    """The ChatML text of each turn, system prompt first, images at the start of the first user turn."""
    if num_images < 0:
        raise ValueError("num_images must be >= 0")
    check_roles(messages)
    turns = [Message(_ROLES[m.role], m.content) for m in messages]
    if not any(t.role == "user" for t in turns):
        roles = ", ".join(dict.fromkeys(m.role for m in messages))
        raise ValueError(f"the conversation has no user message (only {roles}); ask something about the image")
    if turns[0].role != "system":
        turns.insert(0, Message("system", SYSTEM_PROMPT))
    rendered, placed = [], False
    for turn in turns:
        content = turn.content.replace(IMAGE_PLACEHOLDER, "")
        if turn.role == "user" and not placed:
            content = (IMAGE_PLACEHOLDER + "\n") * num_images + content
            placed = True
        rendered.append(f"<|im_start|>{turn.role}\n{content}<|im_end|>\n")
    return rendered


def tokenize_turns(tokenizer, messages: Sequence[Message], num_images: int = 1) -> list[tuple[str, list[int]]]:
    """Each rendered turn (system first) with its token ids, one IMAGE_TOKEN_INDEX per image: the one tokenisation
    of prompts (`tokenize_prompt`) and of training conversations (`medsight.train.losses.training_labels`)."""
    turns = []
    for text in render_messages(messages, num_images):
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if piece:
                # verbose=False: no "Token indices sequence length is longer than ... (N > 2048)" warning; the
                # Engine and the trainer check the whole prompt against the model's own limit, in one clear line.
                ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        turns.append((text, ids))
    return turns


def tokenize_prompt(tokenizer, messages: Sequence[Message], num_images: int = 1) -> list[int]:
    """Token ids of the prompt, with one IMAGE_TOKEN_INDEX per image."""
    return [t for _, ids in tokenize_turns(tokenizer, messages, num_images) for t in ids]


def strip_assistant_prefix(text: str) -> str:
    """The model writes its own `assistant\\n` header (no generation prompt is given): drop it."""
    text = text.lstrip()
    return text[len(ASSISTANT_PREFIX) :] if text.startswith(ASSISTANT_PREFIX) else text
