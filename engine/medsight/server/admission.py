"""How much memory an ask may take, estimated before it is admitted (an ask over the budget is refused with the
numbers, instead of taking the workstation's memory while it runs).

The estimate is an upper bound of the parts that grow with the ask: the language model's key/value cache for every
slice's prompt and new tokens, the kept last-layer states, the prompt's activations (the attention scores are the
largest), one step's logits, and the decoded masks, counting every new token as a possible region code (at most one
per code of the codebook per slice). Weights and the image feature cache are not per-ask and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsight.model.sizes import kv_cache_bytes_per_token

#: Bytes per slice pixel of one decoded region at its peak: float32 logits resampled to the slice, the bool mask
#: and the probability arithmetic (measured on the tiny model: `benchmarks/ask_memory.py`).
REGION_BYTES_PER_PIXEL = 8
#: Bytes of the prompt's activations per token and hidden unit (residual stream, norms, MLP inputs), in elements.
ACTIVATION_ELEMENTS_PER_TOKEN = 8


@dataclass(frozen=True)
class MemoryEstimate:
    kv_cache: int
    states: int
    prompt_activations: int
    logits: int
    regions: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.states + self.prompt_activations + self.logits + self.regions

    def describe(self) -> str:
        mb = 1024**2
        return (f"{self.total / mb:.0f} MiB (key/value cache {self.kv_cache / mb:.0f}, states {self.states / mb:.0f}, "
                f"prompt activations {self.prompt_activations / mb:.0f}, logits {self.logits / mb:.0f}, "
                f"masks {self.regions / mb:.0f})")


def prompt_tokens(engine, messages) -> int:
    """Embeddings of the prompt the model sees for one slice, the image's included, as the engine counts them.
    Raises ValueError for a conversation the model cannot take (a too long one included)."""
    return engine.prompt_length(engine._prompt(messages))


def estimate_ask_memory(config, dtype: torch.dtype, slices: int, prompt_tokens: int, new_tokens: int,
                        slice_pixels: int, num_region_codes: int) -> MemoryEstimate:
    """Upper bound of the memory one ask adds while it runs.

    Args:
        config: the model's `MedSIGHTConfig`.
        prompt_tokens: the tokenized prompt, image tokens included.
        slice_pixels: rows x columns of one slice on the source grid (masks are resampled to it).
    """
    llm = config.llm
    elem = torch.empty(0, dtype=dtype).element_size()
    tokens = prompt_tokens + new_tokens
    kv = slices * tokens * kv_cache_bytes_per_token(config, dtype)
    states = slices * (new_tokens + 1) * llm.hidden_size * elem
    width = max(llm.hidden_size * ACTIVATION_ELEMENTS_PER_TOKEN, llm.intermediate_size * 3)
    attention = llm.num_attention_heads * prompt_tokens * prompt_tokens * 4
    prompt = slices * (prompt_tokens * width * elem + attention)
    logits = slices * llm.vocab_size * 4 * 4  # logits, processed copy, probabilities, sampling work (float32)
    regions = slices * min(new_tokens, num_region_codes) * (slice_pixels * REGION_BYTES_PER_PIXEL
                                                           + config.mask_size**2 * 4 * 2)
    return MemoryEstimate(kv, states, prompt, logits, regions)
