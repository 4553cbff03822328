"""Write a trained model in the official release layout (what `medsight.model.loading.load_official` reads).

    folder/
      region_perceiver/{step:07d}.pt      {"model": region_perceiver.* tensors, "steps": step}  (stage-1 layout)
      unimed_clip_vit_l14.pt              {"state_dict": visual.* tensors}                       (open_clip layout)
      codebook/{step:07d}.pt              stage-2 keys, when the model carries a codebook
      medsight_full_instruct/             config.json (model_type llava_qwen), safetensors shards + index, tokenizer

Plain dicts of tensors only (no argparse Namespace), so `torch.load(weights_only=True)` reads every file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medsight.config import MedSIGHTConfig
from medsight.model.checkpoints import INDEX_FILE, save_safetensors, select_prefix
from medsight.model.lvlm import hf_config

LVLM_DIR = "medsight_full_instruct"
SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size

# Our codebook module names -> the official stage-2 key prefixes (inverse of checkpoints._CODEBOOK_KEY_MAP).
_CODEBOOK_OFFICIAL = (
    ("codebooks.", "quantizer.codebooks."),
    ("to_code.", "region_perceiver.to_code."),
    ("from_code.", "region_perceiver.code_decoder.from_code."),
    ("segmentation_cls_head_quant.", "region_perceiver.code_decoder.segmentation_cls_head_quant."),
    ("modality_predictor.", "modality_predictor."),
)


def export_official(config: MedSIGHTConfig, tokenizer, state: dict[str, torch.Tensor], folder: str | Path,
                    step: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write `state` (a MedSIGHT model's state dict) in the official layout; `dtype` casts floating tensors."""
    folder = Path(folder)

    def cast(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if dtype is None:
            return part
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}

    (folder / "region_perceiver").mkdir(parents=True, exist_ok=True)
    perceiver = cast(select_prefix(state, "region_perceiver."))
    torch.save({"model": {f"region_perceiver.{k}": v.contiguous() for k, v in perceiver.items()}, "steps": step},
               folder / "region_perceiver" / f"{step:07d}.pt")
    vision = cast(select_prefix(state, "image_encoder."))
    torch.save({"state_dict": {f"visual.{k}": v.contiguous() for k, v in vision.items()}},
               folder / "unimed_clip_vit_l14.pt")
    codebook = select_prefix(state, "codebook.")
    if codebook:
        (folder / "codebook").mkdir(exist_ok=True)
        renamed = {}
        for key, value in cast(codebook).items():
            for ours, official in _CODEBOOK_OFFICIAL:
                if key.startswith(ours):
                    renamed[official + key[len(ours):]] = value.contiguous()
        torch.save({"model": renamed, "steps": step}, folder / "codebook" / f"{step:07d}.pt")
    lvlm = folder / LVLM_DIR
    lvlm.mkdir(exist_ok=True)
    write_hf_folder(cast(select_prefix(state, "language_model.")), lvlm)
    hf = hf_config(config)
    hf.architectures = ["RegSegForCausalLM"]
    hf.to_json_file(str(lvlm / "config.json"))
    tokenizer.save_pretrained(str(lvlm))
    return folder


def write_hf_folder(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Safetensors shards of at most `shard_bytes` plus `model.safetensors.index.json` (one file if it fits)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], folder / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, part in zip(names, shards, strict=True):
        save_safetensors(part, folder / name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for name, part in zip(names, shards, strict=True) for k in part}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
