"""`medsight train plan` and the refusal of runs that cannot fit, from the parameter counts of the full model."""

from __future__ import annotations

import json

import pytest

from medsight.cli import main as cli_main
from medsight.config import get_preset
from medsight.train.cli import main as train_main
from medsight.train.plan import GIB, count_parameters, memory_per_gpu

FULL = get_preset("full")


def test_full_model_memory_follows_the_bytes_per_parameter():
    counts = count_parameters(FULL)
    assert counts.total == pytest.approx(8.64e9, rel=0.01)
    plain = memory_per_gpu(FULL, counts, 5, "plain", 1)
    # AdamW with float32 master weights: 16 B per trainable parameter, 4 B per frozen one, plus activations.
    states = 16 * counts.language_model + 4 * (counts.total - counts.language_model)
    assert states < plain < states * 1.05 + 30 * GIB
    sharded = [memory_per_gpu(FULL, counts, 5, "fsdp", n) for n in (1, 2, 4, 8)]
    assert sharded == sorted(sharded, reverse=True)
    assert sharded[2] < 80 * GIB < plain  # 4 x 80 GB holds stage 5; one GPU does not
    lora = memory_per_gpu(FULL, counts, 5, "lora", 1)
    assert 2 * counts.total < lora < 40 * GIB  # the bf16 base dominates


def test_plan_command_prints_every_stage(capsys):
    assert cli_main(["train", "plan", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GPU" not in line]
    assert len(rows) == 5 * 2 + 1  # plain and fsdp for each stage, LoRA for stage 5
    stage5_plain = next(r for r in rows if r.startswith("| 5 |") and "| plain |" in r)
    assert stage5_plain.count("*") == 4  # does not fit 80 GiB on any number of GPUs
    assert "smallest that fits is a 32 GB GPU" in out


def test_train_refuses_a_run_that_cannot_fit(tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"init_from": "full"}))
    args = ["train", "stage5", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--gpu-memory", "80"]
    assert cli_main(args) == 2  # refused before the 8B model is built
    err = capsys.readouterr().err
    assert "needs about 137" in err and "more than the 80 GiB" in err
    assert "fsdp on 2 GPUs" in err and "lora on 1 GPU" in err
    with pytest.raises(ValueError, match="fsdp on 2 GPUs"):
        train_main(args[1:])
