"""torchrun worker for test_fsdp_stages.py: stage 2 and the LoRA recipe of the tiny model under FSDP2 on CPU.

    torchrun --nproc-per-node 2 fsdp_stages_worker.py START DATA_ROOT OUT STAGE2_JSON LORA_JSON

Both start from START (a `save_pretrained` folder without a codebook or adapters), so each rank creates the random
parts (the stage-2 codebook, PEFT's lora_A) itself. Rank 0 writes OUT/result.json with the logged losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from medsight.model.loading import load_pretrained
from medsight.train.stages import LoraConfig, Stage2Config, run_stage2, run_stage5


def main(start: str, data: str, out: str, stage2_json: str, lora_json: str) -> None:
    out_dir = Path(out)
    # LoRA first: its adapters are drawn before anything in this process has seeded the RNG.
    lora = run_stage5(load_pretrained(start), Path(data) / "lvlm" / "train.json", LoraConfig.from_json(lora_json),
                      out_dir / "lora")
    stage2 = run_stage2(load_pretrained(start), data, Stage2Config.from_json(stage2_json), out_dir / "stage2")
    if dist.get_rank() == 0:
        (out_dir / "result.json").write_text(json.dumps({
            "stage2": [r["loss"] for r in stage2.records],
            "lora": [r["loss"] for r in lora.records],
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
