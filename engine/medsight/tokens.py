"""Region-code tokens `[M{m}_{k}]`: names, ids, and labels parsed from answer text.

Code ids are `first_code_id + 32*m + k` (151669 + ... for Qwen3). The released `added_tokens.json` is sorted by
name, so ids are always looked up by name, never by list position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CODE_PATTERN = re.compile(r"\[M(\d+)_(\d+)\]")
NUM_MODALITIES = 18
CODEBOOK_SIZE = 32


def code_name(modality: int, index: int) -> str:
    """The token text of code `index` in modality codebook `modality`."""
    return f"[M{modality}_{index}]"


def all_code_names(num_modalities: int = NUM_MODALITIES, codebook_size: int = CODEBOOK_SIZE) -> list[str]:
    """All code names in id order (modality first, as the official tokenizer added them)."""
    return [code_name(m, k) for m in range(num_modalities) for k in range(codebook_size)]


@dataclass(frozen=True)
class CodeVocabulary:
    """Maps between code-token ids and `(modality, index)` for one tokenizer."""

    first_id: int
    num_modalities: int = NUM_MODALITIES
    codebook_size: int = CODEBOOK_SIZE

    @classmethod
    def from_tokenizer(cls, tokenizer, num_modalities: int = NUM_MODALITIES, codebook_size: int = CODEBOOK_SIZE):
        """Read the code ids from a tokenizer and check they form the contiguous block the model expects."""
        names = all_code_names(num_modalities, codebook_size)
        ids = tokenizer.convert_tokens_to_ids(names)
        unknown = [n for n, i in zip(names, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"the tokenizer lacks {len(unknown)} region-code token(s), e.g. {unknown[0]}")
        first = ids[0]
        wrong = [n for j, (n, i) in enumerate(zip(names, ids, strict=True)) if i != first + j]
        if wrong:
            raise ValueError(f"region-code token ids are not contiguous from {first}: {wrong[0]} is out of place")
        return cls(first, num_modalities, codebook_size)

    @property
    def num_codes(self) -> int:
        return self.num_modalities * self.codebook_size

    def id_of(self, modality: int, index: int) -> int:
        if not (0 <= modality < self.num_modalities and 0 <= index < self.codebook_size):
            raise ValueError(f"no region code {code_name(modality, index)}")
        return self.first_id + self.codebook_size * modality + index

    def is_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        return (token_ids >= self.first_id) & (token_ids < self.first_id + self.num_codes)

    def unknown_codes(self, text: str) -> list[str]:
        """Each region-code-like token in `text` that is none of these codes (a modality or index out of range, or
        another spelling such as `[M01_3]`): the tokenizer splits it into plain text, so it never reaches the mask
        head."""
        return [match.group(0) for match in CODE_PATTERN.finditer(text)
                if not self._is_name(match.group(0), int(match.group(1)), int(match.group(2)))]

    def count_codes(self, text: str) -> int:
        """How many of these codes `text` names: the code-token ids the tokenizer makes of it (an unknown one is
        split into plain text), as `lvlm_losses` counts a sample's codes."""
        return sum(self._is_name(m.group(0), int(m.group(1)), int(m.group(2))) for m in CODE_PATTERN.finditer(text))

    def _is_name(self, text: str, modality: int, index: int) -> bool:
        in_range = modality < self.num_modalities and index < self.codebook_size
        return in_range and text == code_name(modality, index)

    def name_of(self, token_id: int) -> str:
        offset = int(token_id) - self.first_id
        if not 0 <= offset < self.num_codes:
            raise ValueError(f"token id {token_id} is not a region code")
        return code_name(*divmod(offset, self.codebook_size))


# Phrases that sit between a finding's name and its code in the model's answers.
_FILLERS = re.compile(
    r"\b(?:is|are|was|were|has been|have been)?\s*(?:segmented|marked|shown|labell?ed|outlined|highlighted|"
    r"indicated|delineated|identified)(?:\s+(?:as|by|with|in))?\s*$|\b(?:as|and|with|by|in|at)\s*$",
    re.IGNORECASE,
)
_LEAD = re.compile(r"^(?:and|or|the|a|an|segmentations?|findings?|consistent with|including)\b[\s:]*", re.IGNORECASE)
_COPULA = re.compile(r"\b(?:is|are|shows?|showing|reveals?|represents?|with|of)\s+(?:an?\s+|the\s+)?", re.IGNORECASE)


def parse_code_labels(text: str) -> list[tuple[str, str]]:
    """Return `(code, label)` for every region code in an answer, in order, duplicates kept.

    The label is the phrase that names the code, e.g. "Kidney [M0_21], liver [M2_11]." gives
    [("[M0_21]", "Kidney"), ("[M2_11]", "liver")]; "The abnormality is a malignant tumor, segmented as
    [M2_11]." gives "malignant tumor". It is empty when no phrase can be found.
    """
    results = []
    start = 0
    for match in CODE_PATTERN.finditer(text):
        results.append((match.group(0), _label_before(text[start : match.start()])))
        start = match.end()
    return results


def _label_before(segment: str) -> str:
    segment = re.sub(r"\([^)]*\)", " ", segment)
    # Look back clause by clause (then one sentence back) until a clause names something.
    sentences = re.split(r"[.;:!?\n]", segment)[-2:]
    for sentence in reversed(sentences):
        for clause in reversed(sentence.split(",")):
            phrase = re.sub(r"\s+(?:is|are)\s+(?:present|seen|visible|noted)\s*$", "", clause.strip(), flags=re.I)
            previous = None
            while phrase != previous:
                previous = phrase
                phrase = _FILLERS.sub("", phrase).strip()
            phrase = _LEAD.sub("", _COPULA.split(phrase)[-1].strip()).strip()
            if phrase:
                return " ".join(phrase.split()[-5:])
    return ""
