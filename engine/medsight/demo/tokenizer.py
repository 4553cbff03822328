"""A tokenizer made for the demo's language: byte-level BPE merges learned on the demo conversations.

With the merge-free byte tokenizer a tiny language model spells every word byte by byte and can slip inside one
("abnormalivigesiseen"); with merges learned on the demo corpus every answer word is one or two tokens. The
learned merges go into `medsight.model.tokenizer.build_bpe_tokenizer`, so the official prompt format, the chat
specials' ids and the region-code tokens stay those of the byte tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medsight.model.tokenizer import CHAT_SPECIAL_TOKENS, build_bpe_tokenizer
from medsight.prompt import IMAGE_PLACEHOLDER, Message, render_messages

from .qa import CODE_TOKEN, PLACEHOLDER

#: Merges learned by default: on the "default" data (59 distinct answer words, capitalised and spaced variants) 512
#: make every answer word one token; 384 left 4 rare ones (e.g. "gallbladder") at 3-5 tokens, 256 left 17.
DEMO_MERGES = 512
#: Text the merges must not cross: chat specials, the image placeholder and region codes (tokens of their own).
_SEPARATORS = re.compile("|".join([*(re.escape(t) for t in CHAT_SPECIAL_TOKENS), re.escape(IMAGE_PLACEHOLDER),
                                   CODE_TOKEN.pattern, PLACEHOLDER.pattern]))


def corpus(items: Iterable[dict]) -> Iterator[str]:
    """The text pieces of LVLM items as the model reads them: each conversation rendered in the official prompt
    format (system prompt and role headers included), split at specials, ``<image>`` and region codes."""
    for item in items:
        messages = [Message(turn["from"], turn["value"]) for turn in item["conversations"]]
        for text in render_messages(messages, num_images=1):
            yield from (piece for piece in _SEPARATORS.split(text) if piece)


def learn_merges(texts: Iterable[str], num_merges: int = DEMO_MERGES) -> list[tuple[str, str]]:
    """Byte-level BPE merges (most frequent pair first) learned with Hugging Face `tokenizers` on ``texts``,
    pre-tokenized exactly as `build_bpe_tokenizer` does (GPT-2 regex, no prefix space)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    merges = json.loads(core.to_str())["model"]["merges"]
    # Older `tokenizers` versions store a merge as "a b", newer ones as ["a", "b"].
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def build_demo_tokenizer(items: Iterable[dict], num_merges: int = DEMO_MERGES,
                         max_length: int = 2048) -> PreTrainedTokenizerFast:
    """The demo tokenizer for a set of (training) LVLM items, placeholders or codes in their answers."""
    return build_bpe_tokenizer(learn_merges(corpus(items), num_merges), max_length)
