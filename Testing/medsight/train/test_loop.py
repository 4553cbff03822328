"""The trainer's learning-rate schedule against the Hugging Face Trainer's (official stages 3-5)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments
from transformers.optimization import get_cosine_schedule_with_warmup

from medsight.train.loop import cosine_lambda
from medsight.train.stages import Stage5Config


@pytest.mark.parametrize("total", [7, 100, 1337])
def test_warmup_and_cosine_follow_the_hf_trainer(total, tmp_path):
    config = Stage5Config()  # warm-up 3 % and cosine to 0, as the official scripts
    args = TrainingArguments(output_dir=str(tmp_path), warmup_ratio=config.warmup_ratio, lr_scheduler_type="cosine",
                             report_to=[])
    warmup = args.get_warmup_steps(total)
    optimizers = [torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.lr) for _ in range(2)]
    ours = torch.optim.lr_scheduler.LambdaLR(optimizers[0], cosine_lambda(total, config.warmup_ratio, 0.0))
    hf = get_cosine_schedule_with_warmup(optimizers[1], warmup, total)
    got, want = [], []
    for _ in range(total):  # the lr each optimizer step uses
        got.append(ours.get_last_lr()[0])
        want.append(hf.get_last_lr()[0])
        for optimizer in optimizers:
            optimizer.step()  # no gradients: nothing moves; the schedulers expect a step first
        ours.step()
        hf.step()
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-12 * config.lr, (got[:3], want[:3])
