"""The whole MedSIGHT model: image encoder, Region Perceiver, language model, and the optional codebook.

Encode once, decode cheaply: `encode` computes the ViT grid and the 20 region tokens; `decode_regions` re-runs
only the perceiver on that grid with the projected code states. No state is kept between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medsight.answer import Answer
from medsight.config import MedSIGHTConfig
from medsight.model.codebook import RegionCodebook
from medsight.model.generation import GenerationOptions, GenerationOutput, generate
from medsight.model.lvlm import MedSIGHTLanguageModel, hf_config
from medsight.model.perceiver import GridFeatures, RegionPerceiver
from medsight.model.preprocess import ResizeMode, prepare_image
from medsight.model.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer
from medsight.model.vision import build_vision_encoder, encode_image
from medsight.prompt import Message
from medsight.tokens import CodeVocabulary, parse_code_labels


def holds_codebook(weight_names) -> bool:
    """Whether weight names include the stage-2 codebook (`MedSIGHTModel.attach_codebook`'s module): the one rule a
    loader and a check that reads only a file's names (train's stage-4 check) share."""
    return any(name.startswith("codebook.") for name in weight_names)


def groups_by_count(states: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the samples with K > 0 codes, grouped by K (first appearance order).

    The K codes of a sample are decoded jointly, so a batch needs one K: grouping avoids padding, whose
    slots cost as much perceiver work as real ones (`benchmarks/speed_levers.py` measures the difference).
    """
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(states):
        if s.shape[0] > 0:
            groups.setdefault(s.shape[0], []).append(i)
    return list(groups.values())


@dataclass
class ImageEncoding:
    """Per-image features that a question needs: computed once, reusable for any number of questions.

    Attributes:
        cls: (B, C) CLS token of the selected ViT block.
        patches: (B, N, C) patch tokens (N = 576 for the full model).
        grid: (B, G, G, C) the patch tokens as the perceiver's input grid.
        region_tokens: (B, Q, C) the perceiver's final learned queries (Q = 20).
        grid_features: the perceiver's query-independent start on `grid` (`encode(keep_grid_features=True)`), so
            that decoding the same slice in the same request skips it; never cached (4x the grid's memory).
    """

    cls: torch.Tensor
    patches: torch.Tensor
    grid: torch.Tensor
    region_tokens: torch.Tensor
    grid_features: GridFeatures | None = None

    def select(self, index: int) -> ImageEncoding:
        s = slice(index, index + 1)
        kept = None if self.grid_features is None else self.grid_features[s]
        return ImageEncoding(self.cls[s], self.patches[s], self.grid[s], self.region_tokens[s], kept)


@dataclass
class ImageOptions:
    """How an image becomes model input.

    Attributes:
        resize_mode: "crop" is the official centre crop; "letterbox" keeps the whole image.
        round_pixels_to_bf16: the official chatbot rounds the pixel tensor to bfloat16 before the encoder.
    """

    resize_mode: ResizeMode = "letterbox"
    round_pixels_to_bf16: bool = True


class MedSIGHTModel(nn.Module):
    """MedSIGHT: UniMed-CLIP ViT + Region Perceiver + Qwen3 with region-code decoding."""

    def __init__(self, config: MedSIGHTConfig, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_vision_encoder(config.vision)
        self.region_perceiver = RegionPerceiver(config.perceiver)
        self.language_model = MedSIGHTLanguageModel(hf_config(config))
        self.codebook: RegionCodebook | None = None
        # Where the weights came from (set by load_model); "random" until weights are loaded.
        self.weights_source = "random"
        if tokenizer is None and config.llm.vocab_size == BYTE_VOCAB_SIZE:
            tokenizer = build_byte_tokenizer(config.llm.max_sequence_length)
        # Without a tokenizer (e.g. shape-only full-size models) the code ids follow from the vocabulary size.
        self.tokenizer = tokenizer
        self.codes = (
            CodeVocabulary.from_tokenizer(tokenizer) if tokenizer is not None
            else CodeVocabulary(config.llm.first_code_id)
        )
        if self.codes.first_id + self.codes.num_codes != config.llm.vocab_size:
            raise ValueError(
                f"tokenizer codes end at id {self.codes.first_id + self.codes.num_codes - 1} but the model "
                f"vocabulary has {config.llm.vocab_size} rows"
            )

    def attach_codebook(self) -> RegionCodebook:
        """Create the stage-2 codebook (needed for training stages 2 and 4, not for answering)."""
        self.codebook = RegionCodebook(self.config.codebook, self.config.perceiver).to(
            device=self.device, dtype=self.dtype
        )
        return self.codebook

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.region_perceiver.parameters()).dtype

    # -- images -------------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, mode: ResizeMode = "letterbox"):
        """8-bit (H, W[, 3]) image -> normalised (3, S, S) pixels and the transform back to the image."""
        v = self.config.vision
        return prepare_image(image, v.image_size, v.image_mean, v.image_std, mode)

    @torch.inference_mode()
    def encode(
        self, pixel_values: torch.Tensor, round_pixels_to_bf16: bool = True, keep_grid_features: bool = False
    ) -> ImageEncoding:
        """Run the ViT and the perceiver with its learned queries on (B, 3, S, S) pixels.

        Only the region tokens of the perceiver are computed (`RegionPerceiver.region_tokens`, half the work of its
        full forward). `keep_grid_features` keeps its query-independent start for `decode_regions`.
        """
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if round_pixels_to_bf16:
            pixel_values = pixel_values.to(torch.bfloat16)
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        feats = encode_image(self.image_encoder, pixel_values, self.config.vision.select_layer)
        grid = feats.grid
        shared = self.region_perceiver.grid_features(grid)
        tokens = self.region_perceiver.region_tokens(grid, shared)
        return ImageEncoding(feats.cls, feats.patches, grid, tokens, shared if keep_grid_features else None)

    def image_embeddings(self, encoding: ImageEncoding) -> torch.Tensor:
        """(B, N + Q, H): [patch tokens ; region tokens] through `mm_projector`."""
        tokens = torch.cat([encoding.patches, encoding.region_tokens], dim=1)
        projector = self.language_model.mm_projector
        return projector(tokens.to(next(projector.parameters()).dtype))

    # -- language ----------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        encodings: Sequence[ImageEncoding],
        options: GenerationOptions,
        on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        keep_logits: bool = False,
    ) -> GenerationOutput:
        """Generate answers for a batch of prompts; `encodings` supplies each prompt's images in order."""
        with torch.inference_mode():
            embeds = [e for enc in encodings for e in self.image_embeddings(enc)]
            inputs, mask = self.language_model.embed_prompts(
                [list(p) for p in prompts], embeds, self.config.llm.max_sequence_length
            )
            return generate(self.language_model, inputs, mask, self.config.llm.eos_token_id, options,
                            on_step=on_step, should_stop=should_stop, keep_logits=keep_logits)

    def code_states(
        self, output: GenerationOutput, row: int, options: GenerationOptions
    ) -> tuple[list[int], torch.Tensor]:
        """Token indices of the codes in one generated row and the states that decode them (K, H).

        With no code: the official fallback (end-of-prompt state, K = 1) if enabled, else K = 0.
        """
        tokens = output.tokens[row, : output.lengths[row]]
        where = torch.nonzero(self.codes.is_code(tokens)).flatten().tolist()
        if not where:
            if options.no_code_fallback:
                return [], output.states[row, :1]
            return [], output.states[row, :0]
        position = options.hidden_state_position or self.config.code_state_position
        shift = 1 if position == "at" else 0
        index = torch.tensor(where, device=output.states.device) + shift
        return where, output.states[row, index]

    @torch.inference_mode()
    def decode_regions(
        self,
        grids: torch.Tensor,
        states: Sequence[torch.Tensor],
        decode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        grid_features: GridFeatures | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[torch.Tensor]:
        """Decode each sample's code states (K_b, H) on its grid (B, G, G, C) into (K_b, m, m) mask logits.

        Samples with the same K are decoded as one batch (`groups_by_count`): no padding slots to compute and
        no attention mask, and each sample's result is the one it gets alone. `decode` (grids, projected codes)
        -> (mask logits, class logits) replaces `region_perceiver.decode` (the ONNX backend passes its graph).
        `grid_features`: the encode pass's `GridFeatures` of these grids (`encode(keep_grid_features=True)`): the
        same masks without recomputing them (PyTorch path only).
        `should_stop`: polled before each batch; once it returns True the samples not decoded yet get no masks
        (K = 0), for an ask whose answer nobody will read.
        """
        shared = grid_features if decode is None else None
        decode = decode or self.region_perceiver.decode
        results = [grids.new_zeros(0, 0, 0) for _ in states]
        for rows in groups_by_count(states):
            if should_stop is not None and should_stop():
                break
            codes = self.language_model.token_projection(torch.stack([states[i] for i in rows]))
            if shared is None:
                logits, _ = decode(grids[rows], codes.to(self.dtype))
            else:
                logits, _ = self.region_perceiver.decode(grids[rows], codes.to(self.dtype), None, shared[rows])
            for j, i in enumerate(rows):
                results[i] = logits[j]
        return results

    # -- one question --------------------------------------------------------------------------------------
    def ask(
        self,
        image: np.ndarray,
        question: str | Sequence[Message],
        options: GenerationOptions | None = None,
        image_options: ImageOptions | None = None,
    ) -> Answer:
        """Answer a question about one 8-bit image; each generated code becomes a mask on the image's grid.

        The same code path as `medsight.Engine.ask` (it runs one, without a feature cache): identical answers.
        """
        from medsight.engine import Engine  # the engine wraps this class

        return Engine(self, cache_bytes=0).ask([image], question, options, image_options)[0]

    def region_names(self, ids: list[int], text: str, where: list[int], count: int) -> list[tuple[str | None, str]]:
        """(code, label) of each of the `count` decoded masks: the code token at `where[k]` and the phrase the
        answer puts before it; (None, "") for the no-code fallback mask."""
        if not where:
            return [(None, "")] * count
        labels = parse_code_labels(text)
        names = []
        for k in range(count):
            code = self.codes.name_of(ids[where[k]])
            names.append((code, labels[k][1] if k < len(labels) and labels[k][0] == code else ""))
        return names
