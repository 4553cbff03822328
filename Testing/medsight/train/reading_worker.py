"""torchrun worker for test_reading.py: each rank, in a gloo process group as in training, reads its micro-batches of
the conversation data with 0 and with 2 DataLoader workers and saves them.

    torchrun --nproc-per-node 2 reading_worker.py DATA OUT STEPS

Writes OUT/rank{r}-workers{n}.pt: per step, per micro-batch, per sample (input_ids, labels, pixels, masks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.train.data import ConversationDataset, collate_conversations
from medsight.train.loop import SampleOrder, TrainConfig, distributed_info
from medsight.train.reading import MicroBatchIndices, StepReader

BATCH, ACCUM = 1, 2


def main(data: str, out: str, steps: str) -> None:
    dist.init_process_group("gloo")
    rank, world, _ = distributed_info()
    model = build_model(tiny_config())
    v = model.config.vision
    dataset = ConversationDataset(data, model.tokenizer, v.image_size, v.image_mean, v.image_std, codes=model.codes)
    for workers in (0, 2):
        sampler = MicroBatchIndices(SampleOrder(len(dataset), TrainConfig.seed), 0, int(steps), BATCH, ACCUM, world,
                                    rank)
        with StepReader(dataset, collate_conversations, sampler, workers) as reader:
            read = [[[(s.input_ids, s.labels, s.pixels, s.masks) for s in batch] for batch in reader.next_step()]
                    for _ in range(int(steps))]
        torch.save(read, Path(out) / f"rank{rank}-workers{workers}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
