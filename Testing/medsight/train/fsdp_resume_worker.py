"""torchrun worker for test_fsdp_resume.py: a sharded run over a data set of numbers that records what it reads.

    torchrun --nproc-per-node N fsdp_resume_worker.py OUT NUM_SAMPLES MAX_STEPS RESUME(0|1)

Trains the tiny model's `mm_projector` on the samples `0..NUM_SAMPLES-1` (MAX_STEPS 0: one epoch) into OUT/run;
rank r writes the samples its steps read to OUT/seen-{N}-rank{r}.json and rank 0 the steps to OUT/steps-{N}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.train.loop import TrainConfig, train


def main(out: str, num_samples: str, max_steps: str, resume: str) -> None:
    out_dir = Path(out)
    model = build_model(tiny_config(), seed=0)
    model.requires_grad_(False)
    projector = model.language_model.model.mm_projector
    projector.requires_grad_(True)
    width = next(projector.parameters()).shape[1]
    seen: list[int] = []

    def loss_fn(batch: list[int]) -> dict[str, torch.Tensor]:
        seen.extend(batch)
        inputs = torch.tensor(batch, dtype=torch.float32)[:, None].expand(-1, width) / len(batch)
        return {"loss": projector(inputs).square().mean()}

    config = TrainConfig(lr=1e-3, max_steps=int(max_steps), epochs=1.0, save_every=2, device="cpu",
                         fsdp_param_dtype="float32")
    result = train(model, list(projector.parameters()), list(range(int(num_samples))), lambda samples: samples,
                   loss_fn, config, out_dir / "run", resume=resume == "1")
    sharded = dist.is_initialized()  # one process (torchrun --nproc-per-node 1) trains unsharded
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    (out_dir / f"seen-{world}-rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        (out_dir / f"steps-{world}.json").write_text(json.dumps([r["step"] for r in result.records]))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
