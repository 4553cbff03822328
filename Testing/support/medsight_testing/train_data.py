"""Tiny synthetic training data in the demo builder's layout, and the fixed forward the FSDP test compares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 56
NUM_IMAGES = 8


def _shape_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(16, SIZE - 16, size=2)
    r = int(rng.integers(6, 11))
    if kind == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_synthetic(root: Path) -> dict[str, Path]:
    """8 images, two "modalities" (0: dark background + square, 1: noisy background + disc), one mask each,
    a BiomedParse-like meta JSON and LLaVA-style conversations (some with region codes)."""
    rng = np.random.default_rng(0)
    sources = [("ct", 0, "square", 0), ("us", 1, "disc", 1)]
    meta = {"roots": [], "mask_roots": [], "json_paths": [], "modality_labels": []}
    items = []
    for key, modality, shape, category in sources:
        doc = {"images": [], "annotations": [], "categories": [{"id": 0, "name": "square"}, {"id": 1, "name": "disc"}]}
        for i in range(NUM_IMAGES // 2):
            mask = _shape_mask(shape, rng)
            base = rng.normal(40 if modality == 0 else 90, 5 if modality == 0 else 25, (SIZE, SIZE))
            grey = np.clip(np.where(mask, 220, base), 0, 255).astype(np.uint8)
            name = f"{key}_{i}.png"
            _png(root / key / "images" / name, np.repeat(grey[..., None], 3, axis=-1))
            _png(root / key / "masks" / f"{key}_{i}_m.png", mask.astype(np.uint8) * 255)
            image_id = len(doc["images"])
            doc["images"].append({"id": image_id, "file_name": name})
            doc["annotations"].append({"id": image_id, "image_id": image_id, "file_name": name,
                                       "mask_file": f"{key}_{i}_m.png", "category_id": category})
            mid = f"{key}_{i}_m"
            code = f"[M{modality}_{3 + category}]"
            if i % 2 == 0:
                conv = [{"from": "human", "value": f"<image>\nWhere is the {shape}?"},
                        {"from": "gpt", "value": f"The {shape} is {code}."}]
                items.append({"id": f"{key}{i}", "image": f"{key}/images/{name}", "conversations": conv,
                              "mask_files": {mid: f"{key}/masks/{mid}.png"}, "mask_orders": [mid]})
            else:
                conv = [{"from": "human", "value": "<image>\nWhich modality?"},
                        {"from": "gpt", "value": "CT." if modality == 0 else "US."}]
                items.append({"id": f"{key}{i}", "image": f"{key}/images/{name}", "conversations": conv,
                              "mask_files": None, "mask_orders": []})
        (root / f"{key}.json").write_text(json.dumps(doc))
        meta["roots"].append(f"{key}/images")
        meta["mask_roots"].append(f"{key}/masks")
        meta["json_paths"].append(f"{key}.json")
        meta["modality_labels"].append(modality)
    (root / "biomedparse_meta_train.json").write_text(json.dumps(meta))
    (root / "lvlm").mkdir(exist_ok=True)
    (root / "lvlm" / "train.json").write_text(json.dumps(items))
    return {"root": root, "meta": root / "biomedparse_meta_train.json", "lvlm": root / "lvlm" / "train.json"}


def probe(model, data: str | Path) -> dict[str, torch.Tensor]:
    """LM logits and mask logits of the conversation data's first sample (which has a region code)."""
    from medsight.train.data import ConversationDataset
    from medsight.train.losses import lvlm_losses

    v = model.config.vision
    sample = ConversationDataset(data, model.tokenizer, v.image_size, v.image_mean, v.image_std, "crop")[0]
    encoding = model.encode(sample.pixels[None].to(model.device))
    masks = [None if sample.masks is None else sample.masks.to(model.device)]
    out = lvlm_losses(model, [sample.input_ids], [sample.labels], encoding, masks)
    return {"logits": out.logits.float(), "mask_logits": out.mask_logits.float()}
