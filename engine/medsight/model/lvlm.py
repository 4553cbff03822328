"""The MedSIGHT language model: `transformers`' Qwen3ForCausalLM plus the two MedSIGHT projectors.

`model.mm_projector` (vision -> text, mlp2x_gelu) and `model.token_projection` (text -> vision, for region
codes) are attached to the inner Qwen3Model, so the state dict carries exactly the released key names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsight.config import LLMConfig, MedSIGHTConfig

IMAGE_TOKEN_INDEX = -200  # the official placeholder id that is replaced by the image embeddings


class LlavaQwenConfig(Qwen3Config):
    """Qwen3 config with the LLaVA/MedSIGHT fields of the released `config.json` (model_type llava_qwen)."""

    model_type = "llava_qwen"

    def __init__(self, mm_hidden_size: int = 1024, decoder_dim: int = 1024, mm_projector_type: str = "mlp2x_gelu",
                 tokenizer_model_max_length: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mm_hidden_size = mm_hidden_size
        self.decoder_dim = decoder_dim
        self.mm_projector_type = mm_projector_type
        self.tokenizer_model_max_length = tokenizer_model_max_length


def hf_config(cfg: MedSIGHTConfig) -> LlavaQwenConfig:
    """The transformers config of the decoder described by a MedSIGHT config."""
    llm = cfg.llm
    hf = LlavaQwenConfig(
        mm_hidden_size=cfg.vision.width,
        decoder_dim=cfg.perceiver.dim,
        mm_projector_type=llm.mm_projector_type,
        tokenizer_model_max_length=llm.max_sequence_length,
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        head_dim=llm.head_dim,
        max_position_embeddings=llm.max_position_embeddings,
        rope_theta=llm.rope_theta,
        rope_scaling=None,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
        pad_token_id=llm.pad_token_id,
        use_cache=True,
    )
    hf._attn_implementation = "sdpa"
    return hf


def llm_config_from_released(data: dict[str, Any]) -> LLMConfig:
    """Read the decoder sizes from a released `config.json` (model_type llava_qwen)."""
    if data.get("model_type") not in ("llava_qwen", "qwen3"):
        raise ValueError(f"config.json has model_type {data.get('model_type')!r}; expected 'llava_qwen'")
    if data.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"unsupported mm_projector_type {data['mm_projector_type']!r} (only mlp2x_gelu)")
    if data.get("use_sep_proj"):
        raise ValueError("use_sep_proj=true checkpoints (separate region projector) are not supported")
    eos = data.get("eos_token_id", 151645)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"config.json lacks field(s): {', '.join(missing)}")
    return LLMConfig(
        **{k: data[k] for k in keys},
        bos_token_id=data.get("bos_token_id") if data.get("bos_token_id") is not None else eos - 2,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=data.get("pad_token_id") if data.get("pad_token_id") is not None else eos - 2,
        max_sequence_length=data.get("tokenizer_model_max_length", 2048),
        mm_projector_type=data.get("mm_projector_type", "mlp2x_gelu"),
    )


class MedSIGHTLanguageModel(Qwen3ForCausalLM):
    """Qwen3ForCausalLM unchanged, plus `model.mm_projector` and `model.token_projection`."""

    config_class = LlavaQwenConfig

    def __init__(self, config: LlavaQwenConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.model.mm_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.model.token_projection = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.decoder_dim)
        )

    @property
    def mm_projector(self) -> nn.Sequential:
        return self.model.mm_projector

    @property
    def token_projection(self) -> nn.Sequential:
        return self.model.token_projection

    def embed_prompts(
        self, prompts: list[list[int]], image_embeds: list[torch.Tensor], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed token ids, replacing each IMAGE_TOKEN_INDEX by one image's projected embeddings.

        Args:
            prompts: one id list per sample; each holds one IMAGE_TOKEN_INDEX per image it uses.
            image_embeds: the images' (T, hidden) embeddings, consumed in order over all prompts.
            max_length: the longest sequence allowed, in embeddings.

        Returns:
            inputs_embeds (B, L, hidden) left-padded, and attention_mask (B, L) (1 = real).
        """
        embed = self.get_input_embeddings()
        images = iter(image_embeds)
        rows = []
        for ids in prompts:
            pieces, text = [], []
            for token in ids:
                if token == IMAGE_TOKEN_INDEX:
                    if text:
                        pieces.append(embed(torch.tensor(text, device=embed.weight.device)))
                        text = []
                    try:
                        pieces.append(next(images).to(embed.weight.dtype))
                    except StopIteration:
                        raise ValueError("the prompt has more <image> placeholders than images were given") from None
                else:
                    text.append(token)
            if text:
                pieces.append(embed(torch.tensor(text, device=embed.weight.device)))
            row = torch.cat(pieces, dim=0)
            if row.shape[0] > max_length:
                # The official code silently truncates at 2048 embeddings and so loses the question.
                raise ValueError(
                    f"the prompt is {row.shape[0]} embeddings long, more than the model's {max_length}; "
                    "ask about fewer images or shorten the conversation"
                )
            rows.append(row)
        if next(images, None) is not None:
            raise ValueError("more images were given than the prompts have <image> placeholders")
        length = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=out.device)
        for i, row in enumerate(rows):
            out[i, length - row.shape[0] :] = row
            mask[i, length - row.shape[0] :] = 1
        return out, mask
