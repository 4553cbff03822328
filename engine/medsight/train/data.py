"""Training data readers: BiomedParse-like segmentation sets (stages 1-2) and LLaVA-style conversations (3-5).

Segmentation meta JSON (paths relative to the meta file's folder unless absolute)::

    {"roots": [...], "mask_roots": [...] (optional, default roots), "json_paths": [...], "modality_labels": [...]}

Each `json_paths[i]` is a COCO-like file whose `annotations` carry `image_id`, `file_name` (under `roots[i]`),
`mask_file` (under `mask_roots[i]`) and `category_id`; masks of one image are grouped by `image_id`.

Conversation JSON: a list of `{id, image, conversations: [{from, value}], mask_files: {id: png} | null,
mask_orders: [ids in code-mention order]}`; relative paths are looked up under the data root, then the JSON's
folder and its parent (the demo builder writes them relative to its output root, one level above the JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsight.model.preprocess import ResizeMode, prepare_image
from medsight.prompt import Message
from medsight.train.losses import training_labels


def read_rgb(path: str | Path) -> np.ndarray:
    """8-bit (H, W, 3) image."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path: str | Path) -> torch.Tensor:
    """(H, W) float {0, 1}: grey level > 0.5 of full scale, as the official `ToTensor() > 0.5`."""
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey > 0.5).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Stages 1-2
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationSample:
    """One image: model-input pixels, its GT masks at native resolution, their classes and the modality label."""

    pixels: torch.Tensor  # (3, S, S)
    masks: torch.Tensor  # (G, H, W) float {0, 1}
    classes: torch.Tensor  # (G,) long
    modality: int


@dataclass
class _ImageRecord:
    image: Path
    masks: list[Path]
    classes: list[int]
    modality: int


class SegmentationDataset:
    """Reads the BiomedParse-like meta JSON; images go through `prepare_image` (the inference transform)."""

    def __init__(self, meta_path: str | Path, image_size: int, mean, std, resize_mode: ResizeMode = "crop",
                 num_classes: int | None = None) -> None:
        meta_path = Path(meta_path)
        meta = json.loads(meta_path.read_text())
        base = meta_path.parent
        roots, jsons, labels = meta["roots"], meta["json_paths"], meta["modality_labels"]
        mask_roots = meta.get("mask_roots") or roots
        if not len(roots) == len(jsons) == len(labels) == len(mask_roots):
            raise ValueError(f"{meta_path}: roots, mask_roots, json_paths and modality_labels differ in length")
        self.image_size, self.mean, self.std, self.resize_mode = image_size, mean, std, resize_mode
        self.records: list[_ImageRecord] = []
        for root, mask_root, json_path, label in zip(roots, mask_roots, jsons, labels, strict=True):
            doc = json.loads((base / json_path).read_text())
            grouped: dict[object, _ImageRecord] = {}
            for ann in doc.get("annotations", []):
                record = grouped.setdefault(
                    ann["image_id"], _ImageRecord(base / root / ann["file_name"], [], [], int(label))
                )
                record.masks.append(base / mask_root / ann["mask_file"])
                record.classes.append(int(ann["category_id"]))
            self.records += list(grouped.values())
        if num_classes is not None:
            bad = sorted({c for r in self.records for c in r.classes if not 0 <= c < num_classes})
            if bad:
                raise ValueError(f"{meta_path}: category ids {bad} outside the model's {num_classes} classes")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegmentationSample:
        record = self.records[index]
        pixels, _ = prepare_image(read_rgb(record.image), self.image_size, self.mean, self.std, self.resize_mode)
        masks = torch.stack([read_mask(p) for p in record.masks])
        return SegmentationSample(pixels, masks, torch.tensor(record.classes, dtype=torch.long), record.modality)


@dataclass
class SegmentationBatch:
    pixels: torch.Tensor  # (B, 3, S, S)
    masks: list[torch.Tensor]
    classes: list[torch.Tensor]
    modalities: list[int]


def collate_segmentation(samples: list[SegmentationSample]) -> SegmentationBatch:
    """Pixels stacked; masks stay a list because sizes and counts differ between images (official collate)."""
    return SegmentationBatch(
        torch.stack([s.pixels for s in samples]),
        [s.masks for s in samples],
        [s.classes for s in samples],
        [s.modality for s in samples],
    )


# ----------------------------------------------------------------------------------------------------------------
# Stages 3-5
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ConversationSample:
    """One teacher-forced conversation: ids/labels (one image placeholder), pixels and masks in code order."""

    input_ids: list[int]
    labels: list[int]
    pixels: torch.Tensor  # (3, S, S)
    masks: torch.Tensor | None  # (n, 1, H, W) in `mask_orders` order, or None


class ConversationDataset:
    """Reads the official LVLM JSON list; labels follow `training_labels` (the LLaVA-NeXT rule by default)."""

    def __init__(self, json_path: str | Path, tokenizer, image_size: int, mean, std,
                 resize_mode: ResizeMode = "crop", data_root: str | Path | None = None,
                 label_prompt_markup: bool = True) -> None:
        json_path = Path(json_path)
        self.items = json.loads(json_path.read_text())
        self.roots = [Path(r) for r in (data_root, json_path.parent, json_path.parent.parent) if r is not None]
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std, self.resize_mode = image_size, mean, std, resize_mode
        self.label_prompt_markup = label_prompt_markup
        for item in self.items:
            images = item["image"] if isinstance(item["image"], list) else [item["image"]]
            if len(images) != 1:
                # `lvlm_losses` pairs one encoding with each sample.
                raise ValueError(f"item {item.get('id')}: {len(images)} images; only one image per item is supported")

    def __len__(self) -> int:
        return len(self.items)

    def resolve(self, path: str) -> Path:
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        for root in self.roots:
            if (root / candidate).exists():
                return root / candidate
        raise FileNotFoundError(f"{path} not found under {', '.join(map(str, self.roots))}")

    def __getitem__(self, index: int) -> ConversationSample:
        item = self.items[index]
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        pixels, _ = prepare_image(read_rgb(self.resolve(image)), self.image_size, self.mean, self.std,
                                  self.resize_mode)
        messages = [Message(turn["from"], turn["value"]) for turn in item["conversations"]]
        ids, labels = training_labels(self.tokenizer, messages, num_images=1,
                                      label_prompt_markup=self.label_prompt_markup)
        order = item.get("mask_orders") or []
        masks = None
        if order:
            files = item.get("mask_files") or {}
            masks = torch.stack([read_mask(self.resolve(files[str(m)])) for m in order])[:, None]
        return ConversationSample(ids, labels, pixels, masks)


def collate_conversations(samples: list[ConversationSample]) -> list[ConversationSample]:
    """Kept as a list: `lvlm_losses` pads itself (batch size 1 per step is the official setting)."""
    return list(samples)
