"""Prompt and tokenisation views that only the tests use: the prompt string of one question (the golden
fixtures' `prompt_string`) and how many tokens cover each word of a text."""

from __future__ import annotations

from medsight.demo.qa import CODE_TOKEN, PLACEHOLDER, WORD
from medsight.prompt import Message, render_messages


def prompt_text(question: str, num_images: int = 1) -> str:
    """The full prompt string for a single question (before the image placeholder is replaced)."""
    return "".join(render_messages([Message("user", question)], num_images))


def tokens_per_word(tokenizer, text: str) -> list[tuple[str, int]]:
    """Each word (letter run, `qa.WORD`; region codes and placeholders are no words) of ``text`` with the number
    of tokens that cover part of it, as ``tokenizer`` splits the whole text (a leading space shares the word's
    token)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(s, e) for s, e in enc["offset_mapping"] if e > s]
    codes = [m.span() for pattern in (CODE_TOKEN, PLACEHOLDER) for m in pattern.finditer(text)]
    return [(m.group(), sum(1 for s, e in spans if s < m.end() and e > m.start())) for m in WORD.finditer(text)
            if not any(s <= m.start() < e for s, e in codes)]
