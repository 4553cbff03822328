"""Tokenizers: the released Qwen3 tokenizer folder, or a byte-level one for the small presets (optionally with
BPE merges, as the demo model learns on its own corpus: `medsight.demo.tokenizer`).

The byte-level tokenizer has Qwen's ids for single bytes (newline 198, space 220), then `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` and the 576 region codes, so the small models use the same prompt structure and
code-id arithmetic as the full model without shipping Qwen's 150k-entry vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medsight.model.checkpoints import CheckpointError
from medsight.tokens import CodeVocabulary, all_code_names

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_VOCAB_SIZE = 256 + len(CHAT_SPECIAL_TOKENS) + 576


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of GPT-2-style byte-level BPE, in Qwen's id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_byte_tokenizer(max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A merge-free byte-level tokenizer with the chat specials and the 576 region codes (835 ids)."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return _with_specials_and_codes(core, max_length)


def build_bpe_tokenizer(merges: Sequence[tuple[str, str]], max_length: int = 2048) -> PreTrainedTokenizerFast:
    """The byte tokenizer plus byte-level BPE ``merges`` (pairs of byte-level symbols, in rank order).

    Bytes keep ids 0-255 and the chat specials 256-258, as in `build_byte_tokenizer`; each merge's symbol follows
    in merge order, then the 576 region codes (the last ids, as the model's code arithmetic expects). So the
    prompt format, the specials' ids and the codes are those of the byte tokenizer; only the vocabulary grows.
    """
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for token in CHAT_SPECIAL_TOKENS:  # in the model's vocabulary, so adding them as specials keeps these ids
        vocab[token] = len(vocab)
    for a, b in merges:
        if a not in vocab or b not in vocab:
            raise ValueError(f"merge ({a!r}, {b!r}) uses a symbol no earlier merge made")
        if a + b in vocab:
            raise ValueError(f"merge ({a!r}, {b!r}) repeats the symbol {a + b!r}")
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges]))
    return _with_specials_and_codes(core, max_length)


def _with_specials_and_codes(core: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level pre-tokenizer and decoder, the chat specials and the region codes on a BPE ``core``."""
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CHAT_SPECIAL_TOKENS])
    core.add_tokens([AddedToken(name, normalized=True, special=False) for name in all_code_names()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (local files only) and check its region codes."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer files in {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # the `tokenizers` parser raises a bare Exception for a malformed tokenizer.json
        raise CheckpointError(f"{folder}: the tokenizer files are not readable ({err})") from None
    try:
        CodeVocabulary.from_tokenizer(tokenizer)
    except ValueError as err:  # e.g. a plain Qwen3 folder: the MedSIGHT tokenizer adds the region codes
        raise CheckpointError(f"{folder}: {err}; a MedSIGHT tokenizer is needed") from None
    return tokenizer
