"""`medsight train stageN --config cfg.json --data DIR --out DIR [--resume]`.

`main(argv)` takes the arguments after `train` (e.g. `["stage1", "--config", ...]`). The config JSON holds fields
of the stage's config dataclass (`Stage1Config` ... `Stage5Config`); missing fields keep the official defaults.
The starting model is `init_from` (a preset name or a `save_pretrained` folder such as the previous stage's
`final/`). Under `torchrun --nproc_per_node N -m medsight.train.cli stageN ...` the same command trains on N
processes (see `medsight.train.loop`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medsight.config import PRESETS, get_preset
from medsight.model.loading import build_model, load_pretrained
from medsight.model.medsight import MedSIGHTModel
from medsight.train.loop import TrainConfig
from medsight.train.stages import RUNNERS, STAGE_CONFIGS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medsight train", description="Train one MedSIGHT stage.")
    p.add_argument("stage", choices=[f"stage{n}" for n in sorted(RUNNERS)], help="which stage to train")
    p.add_argument("--config", type=Path, help="JSON with stage config fields (default: official settings)")
    p.add_argument("--data", type=Path, required=True,
                   help="stages 1-2: meta JSON or folder with biomedparse_meta_train.json; "
                        "stages 3-5: conversation JSON or folder with lvlm/train.json")
    p.add_argument("--out", type=Path, required=True, help="output folder (logs, plot, checkpoints, final/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    return p


def load_config(stage: int, path: Path | None) -> TrainConfig:
    kind = STAGE_CONFIGS[stage]
    return kind.from_json(path) if path is not None else kind()


def initial_model(config: TrainConfig) -> MedSIGHTModel:
    """The model a run starts from (a resumed run overwrites its weights from the checkpoint)."""
    if config.init_from in PRESETS:
        return build_model(get_preset(config.init_from), seed=config.seed)
    return load_pretrained(config.init_from)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stage = int(args.stage.removeprefix("stage"))
    config = load_config(stage, args.config)
    model = initial_model(config)
    result = RUNNERS[stage](model, args.data, config, args.out, resume=args.resume)
    last = result.records[-1] if result.records else {}
    print(json.dumps({"stage": stage, "steps": result.last_step, "final": str(result.final_dir),
                      "last_loss": last.get("loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
