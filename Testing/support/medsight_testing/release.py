"""Writes golden tensors in the official release layouts, the way users receive them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_release(golden: Path, root: Path, sharded: bool = True, namespace_args: bool = True) -> Path:
    """Write golden tensors as a release folder: region_perceiver/0079280.pt, a UniMed-CLIP file, the
    stage-2 file and medsight_full_instruct/ (config.json, safetensors shards + index, tokenizer)."""
    (root / "region_perceiver").mkdir(parents=True)
    stage1 = torch.load(golden / "perceiver_stage1_ckpt.pt", weights_only=True)
    if namespace_args:  # the released file pickles an argparse.Namespace
        stage1["args"] = argparse.Namespace(**stage1["args"])
    torch.save(stage1, root / "region_perceiver" / "0079280.pt")
    clip = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.items()}}, root / "unimed_clip_vit_l14.pt")
    (root / "codebook").mkdir()
    shutil.copy(golden / "codebook_stage2_ckpt.pt", root / "codebook" / "0035673.pt")
    lvlm = root / "medsight_full_instruct"
    shutil.copytree(golden / "tiny_tokenizer", lvlm)
    shutil.copy(golden / "lvlm_tiny_config.json", lvlm / "config.json")
    state = torch.load(golden / "lvlm_tiny_state_dict.pt", weights_only=True)
    if sharded:
        keys = list(state)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for name, part in shards.items():
            save_file({k: state[k].contiguous() for k in part}, str(lvlm / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
        (lvlm / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(lvlm / "model.safetensors"))
    return root
