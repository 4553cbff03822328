"""torchrun worker for test_fsdp.py: stage 5 of the tiny model under FSDP2 on CPU (gloo), all checks in one launch.

    torchrun --nproc-per-node 2 fsdp_worker.py START DATA OUT CONFIG_JSON

1. trains 5 steps from START (a `save_pretrained` folder) and records the losses and each rank's parameter count;
2. runs the probe (logits and mask logits of the first sample) on the sharded model;
3. resumes from the step-3 checkpoint into a differently initialised model and records steps 4-5;
4. trains stage 4 for 2 steps (its gradient mask works on the embedding's shards) and records which rows moved.
Rank 0 writes OUT/result.json and OUT/probe.pt; the test compares them with single-process runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from medsight.config import tiny_config
from medsight.model.loading import build_model, load_pretrained
from medsight.train import fsdp
from medsight.train.loop import CHECKPOINT_DIR
from medsight.train.stages import Stage4Config, Stage5Config, run_stage4, run_stage5
from medsight_testing.train_data import probe


def main(start: str, data: str, out: str, config_json: str) -> None:
    out_dir = Path(out)
    config = Stage5Config.from_json(config_json)
    model = load_pretrained(start)
    result = run_stage5(model, data, config, out_dir / "run")
    rank = dist.get_rank()
    local, total = fsdp.local_numel(model)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, [local, total])

    # The probe runs inside the FSDP root's forward, where every unit all-gathers as in training.
    runner = result.runner
    assert runner is not None
    runner.loss_fn = lambda batch: probe(model, batch)
    with torch.no_grad():
        outputs = runner(fsdp.Opaque(data))

    k = config.save_every
    resumed_dir = out_dir / "resumed"
    if rank == 0:
        shutil.copytree(out_dir / "run" / CHECKPOINT_DIR / f"step-{k:07d}",
                        resumed_dir / CHECKPOINT_DIR / f"step-{k:07d}")
    dist.barrier()
    other = build_model(tiny_config(), seed=123)  # different weights: they must come from the checkpoint
    resumed = run_stage5(other, data, config, resumed_dir, resume=True)
    stage4 = build_model(tiny_config(), seed=0)
    stage4.attach_codebook()
    before = stage4.language_model.get_input_embeddings().weight.detach().clone()
    result4 = run_stage4(stage4, data, Stage4Config(max_steps=2, grad_accum=1, warmup_ratio=0.0), out_dir / "stage4")
    if rank == 0:
        after = load_pretrained(result4.final_dir).language_model.get_input_embeddings().weight
        moved = torch.nonzero((after != before).any(dim=1)).flatten().tolist()
        torch.save({k: v.detach().cpu() for k, v in outputs.items()}, out_dir / "probe.pt")
        (out_dir / "result.json").write_text(json.dumps({
            "losses": [r["loss"] for r in result.records],
            "resumed_steps": [r["step"] for r in resumed.records],
            "resumed_losses": [r["loss"] for r in resumed.records],
            "counts": counts,
            "final": str(result.final_dir),
            "stage4_moved_rows": moved,
            "stage4_code_rows": [stage4.codes.first_id, stage4.codes.num_codes],
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
