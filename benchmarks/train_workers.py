"""Training-sample read throughput with and without DataLoader workers (`num_workers`; not a test).

Usage: python benchmarks/train_workers.py [--images 48] [--size 1024] [--workers 2] [--steps 40]

Writes realistic data to a temporary folder (SIZE x SIZE RGB PNGs of textured noise, as BiomedParse's 1024-pixel
slices, each with one 0/255 mask; the BiomedParse-like meta JSON for stages 1-2 and conversations for 3-5) and reads
STEPS steps of batch 2 through `medsight.train.reading.StepReader` with 0 workers and with WORKERS, at the full
model's image size (decode, resize, normalise, and for conversations tokenise with the Qwen3 tokenizer). Prints the
samples/s of each after the first step (the workers' start, printed apart, is paid once per run) and the ratio.
Nothing computes between steps here, so the ratio is the read's alone: on a GPU the step runs meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medsight.config import get_preset, tiny_config
from medsight.model.loading import build_model
from medsight.train.data import ConversationDataset, SegmentationDataset, collate_conversations, collate_segmentation
from medsight.train.loop import SampleOrder
from medsight.train.reading import MicroBatchIndices, StepReader, Unreadable

BATCH = 2


def write_data(root: Path, images: int, size: int) -> tuple[Path, Path]:
    """`images` textured RGB PNGs with a disc mask each; returns (segmentation meta, conversation JSON)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    annotations, items = [], []
    for i in range(images):
        smooth = np.cumsum(rng.normal(0, 4, (size, size)), axis=1)  # texture that compresses as scans do
        grey = np.clip(100 + smooth - smooth.mean(), 0, 255).astype(np.uint8)
        mask = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / (5 + i % 4)) ** 2).astype(np.uint8) * 255
        (root / "images").mkdir(exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        annotations.append({"image_id": i, "file_name": f"{i}.png", "mask_file": f"{i}.png", "category_id": 0})
        items.append({"id": str(i), "image": f"images/{i}.png", "mask_files": {"m": f"masks/{i}.png"},
                      "mask_orders": ["m"], "conversations": [
                          {"from": "human", "value": "<image>\nDescribe the findings and segment the lesion."},
                          {"from": "gpt", "value": "A round hypodense lesion in the left lobe, about 3 cm. " * 4}]})
    (root / "ann.json").write_text(json.dumps({"annotations": annotations}))
    (root / "meta.json").write_text(json.dumps({"roots": ["images"], "mask_roots": ["masks"],
                                                "json_paths": ["ann.json"], "modality_labels": [0]}))
    (root / "train.json").write_text(json.dumps(items))
    return root / "meta.json", root / "train.json"


def samples_per_second(dataset, collate, workers: int, steps: int) -> tuple[float, float]:
    """(seconds to the first step, samples/s over the steps after it)."""
    sampler = MicroBatchIndices(SampleOrder(len(dataset), 0), 0, steps, BATCH, 1, 1, 0)
    start = time.perf_counter()
    with StepReader(dataset, collate, sampler, workers) as reader:
        assert not isinstance(reader.next_step(), Unreadable)
        first = time.perf_counter()
        for _ in range(steps - 1):
            assert not isinstance(reader.next_step(), Unreadable)
        end = time.perf_counter()
    return first - start, (steps - 1) * BATCH / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    vision = get_preset("full").vision
    tokenizer = build_model(tiny_config()).tokenizer  # the real Qwen3 tokenizer
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.images} images of {args.size}x{args.size} px, read at {vision.image_size} px, batch {BATCH}, "
          f"{args.steps} steps, {cores} cores")
    with tempfile.TemporaryDirectory() as folder:
        meta, conversations = write_data(Path(folder), args.images, args.size)
        kinds = {
            "stages 1-2 (segmentation)": (SegmentationDataset(meta, vision.image_size, vision.image_mean,
                                                              vision.image_std), collate_segmentation),
            "stages 3-5 (conversations)": (ConversationDataset(conversations, tokenizer, vision.image_size,
                                                               vision.image_mean, vision.image_std),
                                           collate_conversations),
        }
        samples_per_second(*kinds["stages 1-2 (segmentation)"], args.workers, 2)  # start the fork server once
        print(f"{'data':28s} {'0 workers':>12s} {f'{args.workers} workers':>12s} {'ratio':>7s} {'start (s)':>14s}")
        for name, (dataset, collate) in kinds.items():
            start0, rate0 = samples_per_second(dataset, collate, 0, args.steps)
            start_n, rate_n = samples_per_second(dataset, collate, args.workers, args.steps)
            print(f"{name:28s} {rate0:9.1f} /s {rate_n:9.1f} /s {rate_n / rate0:6.2f}x "
                  f"{start0:6.2f} / {start_n:5.2f}")


if __name__ == "__main__":
    main()
