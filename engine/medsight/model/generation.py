"""Batched token generation from input embeddings, keeping the last-layer state of every step.

The official path calls `generate(inputs_embeds=..., output_hidden_states=True)`; this loop computes the same
tokens with the same logits processors from `transformers`, but keeps only the states that mask decoding
needs, stops each sequence on its own, streams tokens, and can be cancelled between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from medsight.model.lvlm import MedSIGHTLanguageModel

StatePosition = Literal["before", "at"]


#: The official chatbot's limit; every front end (API, CLI, evaluation) defaults to it.
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class GenerationOptions:
    """Decoding settings. The defaults are the official segmentation path (greedy, penalty 1.2).

    Attributes:
        hidden_state_position: which last-layer state decodes a region code. "before" (official inference):
            the state that predicted the code. "at" (as in training): the state of the code token itself.
            None: the model's own `MedSIGHTConfig.code_state_position`.
        seed: seeds sampling (`do_sample`); an image's sampled answer is the same whether it is asked alone or
            in a batch with others.
        no_code_fallback: official behaviour when no code is generated: decode one mask from the state at the
            end of the prompt. Off by default: no code, no mask.
        logits_processors: extra `transformers` logits processors, applied after the built-in ones.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.2
    seed: int | None = None
    hidden_state_position: StatePosition | None = None
    no_code_fallback: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.hidden_state_position not in (None, "before", "at"):
            raise ValueError("hidden_state_position must be 'before' (official inference) or 'at' (training)")

    def processors(self, eos_token_id: int) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.min_new_tokens > 0:
            procs.append(MinNewTokensLengthLogitsProcessor(0, self.min_new_tokens, eos_token_id))
        procs.extend(self.logits_processors)
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class GenerationOutput:
    """Generated tokens and states of a batch.

    Attributes:
        tokens: (B, T) new tokens; after a sequence's end-of-turn token the row holds that token repeated.
        lengths: new tokens per sequence, its end-of-turn token included.
        states: (B, T + 1, H) last-layer states; states[:, t] is the state that predicted tokens[:, t] (so
            states[:, 0] is the end of the prompt) and states[:, t + 1] is the state at tokens[:, t].
            Row entries past a sequence's length are meaningless.
        raw_logits / scores: (B, T, V) float32 logits before and after processing, when requested.
        cancelled: generation was stopped early by the caller.
    """

    tokens: torch.Tensor
    lengths: list[int]
    states: torch.Tensor
    raw_logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    cancelled: bool = False


@torch.inference_mode()
def generate(
    lm: MedSIGHTLanguageModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_token_id: int,
    options: GenerationOptions,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_logits: bool = False,
) -> GenerationOutput:
    """Generate from left-padded `inputs_embeds` (B, L, H) with `attention_mask` (B, L).

    Args:
        on_step: called after every step with the new tokens (B,) and the finished flags (B,).
        should_stop: polled between steps; returning True cancels generation.
        keep_logits: also return raw and processed logits (for parity checks).
    """
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    processors = list(options.processors(eos_token_id))
    generators = None
    if options.do_sample and options.seed is not None:
        # One generator per row, all seeded alike: a row's draws then depend only on its own probabilities, so a
        # seeded slice samples the same answer alone or in any batch (one shared generator made row i's draws
        # depend on the rows before it and the batch size).
        generators = [torch.Generator(device=device).manual_seed(options.seed) for _ in range(batch)]
    cache = DynamicCache()
    mask = attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True)
    state = out.last_hidden_state[:, -1]
    states, tokens, raw, processed = [state], [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    done = [False] * batch  # `finished` on the host: one transfer per step, not one per row
    lengths = [0] * batch
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    cancelled = False
    next_position = positions[:, -1:] + 1
    cache_position = torch.tensor([inputs_embeds.shape[1]], device=device)
    step_mask = _unpadded_step_mask(lm, mask)
    embed = lm.get_input_embeddings()
    for step in range(options.max_new_tokens):
        logits = lm.lm_head(state).float()
        # Processors may write into their input: keep the raw logits intact only when they are returned.
        scores = _process(processors, generated, logits.clone() if keep_logits else logits)
        token = _sample(torch.softmax(scores, dim=-1), generators) if options.do_sample else scores.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        for i in range(batch):
            if not done[i]:
                lengths[i] = step + 1
        finished = finished | (token == eos_token_id)
        done = finished.tolist()
        generated = torch.cat([generated, token[:, None]], dim=1)
        tokens.append(token)
        if keep_logits:
            raw.append(logits)
            processed.append(scores)
        if on_step is not None:
            on_step(token, finished)
        if should_stop is not None and should_stop():
            cancelled = True
        last_step = step == options.max_new_tokens - 1
        if cancelled or all(done):
            break
        if last_step and options.hidden_state_position == "before":
            break
        # Feed the new token; the resulting state is the state *at* that token (needed for "at").
        if step_mask is None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        out = lm.model(inputs_embeds=embed(token[:, None]), attention_mask=mask if step_mask is None else step_mask,
                       position_ids=next_position, past_key_values=cache, use_cache=True,
                       cache_position=cache_position)
        next_position = next_position + 1
        cache_position = cache_position + 1
        state = out.last_hidden_state[:, -1]
        states.append(state)
        if last_step:
            break
    return GenerationOutput(
        tokens=torch.stack(tokens, dim=1),
        lengths=lengths,
        states=torch.stack(states, dim=1),
        raw_logits=torch.stack(raw, dim=1) if keep_logits else None,
        scores=torch.stack(processed, dim=1) if keep_logits else None,
        cancelled=cancelled,
    )


def _sample(probs: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row of (B, V) probabilities; row i draws from generators[i] when seeded."""
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generators)]).squeeze(1)


def _process(processors: list[LogitsProcessor], generated: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`LogitsProcessorList.__call__` without its per-call signature inspection (none of ours takes extra
    arguments), skipping the minimum-length processor once it can no longer change anything."""
    for processor in processors:
        if isinstance(processor, MinNewTokensLengthLogitsProcessor) and (
            generated.shape[-1] - processor.prompt_length_to_skip >= processor.min_new_tokens
        ):
            continue  # from here on it returns its input unchanged
        scores = processor(generated, scores)
    return scores


def _unpadded_step_mask(lm: MedSIGHTLanguageModel, mask: torch.Tensor) -> dict[str, None] | None:
    """The ready-made attention masks of a one-token step when no row has padding (every one-slice ask), else None.

    With SDPA and no padding, transformers' `create_causal_mask` returns None for a one-token query (all cached
    keys are visible); handing that result over directly skips rebuilding and checking a growing 2-D mask on
    every step, with the same attention call. Padded batches keep the 2-D mask path.
    """
    config = lm.model.config
    if config._attn_implementation != "sdpa" or getattr(lm.model, "has_sliding_layers", False):
        return None
    if not bool(mask.all()):
        return None
    return {"full_attention": None}
