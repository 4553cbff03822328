"""The trainer's learning-rate schedule against the Hugging Face Trainer's (official stages 3-5)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments
from transformers.optimization import get_cosine_schedule_with_warmup

from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.train import state as trainer_state
from medsight.train.loop import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    LOG_FILE,
    SHARDED_STATE_FILE,
    STATE_FILE,
    TrainConfig,
    cosine_lambda,
    latest_checkpoint,
    read_log,
    train,
)
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


def test_a_lengthened_run_continues_on_the_new_schedule(tmp_path):
    """--resume with a larger max_steps: the cosine spans the new length from the first resumed step on."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    first = TrainConfig(lr=1e-3, max_steps=2, device="cpu")
    train(model, params, [0, 1], lambda samples: samples, loss_fn, first, tmp_path)
    longer = replace(first, max_steps=4)
    result = train(model, params, [0, 1], lambda samples: samples, loss_fn, longer, tmp_path, resume=True)
    factor = cosine_lambda(longer.max_steps, longer.warmup_ratio, 0.0)
    # (The finished run's scheduler had left the lr at the end of the old cosine, 0, for the first resumed step.)
    assert [r["lr"] for r in result.records] == pytest.approx([longer.lr * factor(s) for s in (2, 3)], rel=1e-12)


def test_latest_checkpoint_orders_by_step_number_past_seven_digits(tmp_path):
    """Folders are named `step-{step:07d}` as the loop writes them; step 10,000,000 sorts before 9,999,999 by name."""
    for step in (9_999_999, 10_000_000, 10_000_001):
        folder = tmp_path / CHECKPOINT_DIR / f"step-{step:07d}"
        folder.mkdir(parents=True)
        if step != 10_000_001:  # the last one was cut off before its state was written: incomplete
            trainer_state.write_json(folder / SHARDED_STATE_FILE, {"step": step})
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and trainer_state.read_json(latest / SHARDED_STATE_FILE)["step"] == 10_000_000


def test_fewer_epochs_on_another_number_of_processes_are_refused(tmp_path):
    """A resume can lengthen a run, not shorten it. On another number of processes (here: a checkpoint that read
    twice the samples per step, as a 2-process run does) the steps left are worked out from the samples read; fewer
    epochs than were read must be refused as at the same number of processes, not pass as "nothing to train"."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())
    data = list(range(8))

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    config = TrainConfig(lr=1e-3, epochs=1.0, batch_size=2, device="cpu")
    steps = len(train(model, params, data, lambda samples: samples, loss_fn, config, tmp_path).records)
    state_path = latest_checkpoint(tmp_path) / STATE_FILE
    read = 2 * steps * config.batch_size  # what 2 processes would have read in as many steps
    trainer_state.save_tensors(state_path, {**trainer_state.load_tensors(state_path), "samples": read})
    with pytest.raises(ValueError, match="a resume can lengthen a run, not shorten it"):
        train(model, params, data, lambda samples: samples, loss_fn, replace(config, epochs=1.5), tmp_path,
              resume=True)
    # Lengthened past what was read, it trains on the samples left, at this run's samples per step.
    longer = replace(config, epochs=3.0)
    result = train(model, params, data, lambda samples: samples, loss_fn, longer, tmp_path, resume=True)
    assert len(result.records) == math.ceil((longer.epochs * len(data) - read) / config.batch_size)


def test_a_step_of_more_samples_than_the_data_set_holds_is_refused(tmp_path):
    """batch_size x grad_accum above the data set's size put the same samples into one step several times (batch 20
    on 8 images: one step on 2.5 copies). Refused before anything is written; the whole data set in one step is
    each sample once."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())
    data = list(range(3))
    seen: list[int] = []

    def loss_fn(batch):
        seen.extend(batch)
        return {"loss": sum(p.square().sum() for p in params)}

    out = tmp_path / "run"
    for batch_size, grad_accum in ((len(data) + 1, 1), (len(data) - 1, 2)):
        config = TrainConfig(lr=1e-3, max_steps=1, batch_size=batch_size, grad_accum=grad_accum, device="cpu")
        with pytest.raises(ValueError, match=rf"batch_size {batch_size} x grad_accum {grad_accum} = "
                                             rf"{batch_size * grad_accum} samples per optimizer step, but the "
                                             rf"training data holds {len(data)}: one step would count samples more"):
            train(model, params, data, lambda samples: samples, loss_fn, config, out)
    assert seen == [] and not out.exists()
    config = TrainConfig(lr=1e-3, max_steps=1, batch_size=len(data), device="cpu")
    train(model, params, data, lambda samples: samples, loss_fn, config, out)
    assert sorted(seen) == data


KILLED_WHILE_REWRITING_THE_LOG = """
import os, sys
from pathlib import Path
from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.train.loop import LOG_FILE, TrainConfig, train

real_write_text = Path.write_text


def torn_write_text(self, data, *args, **kwargs):
    # The loss log (or the temporary file it is written through): half of it, then die (like a SIGKILL).
    if LOG_FILE in self.name:
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        os._exit(9)
    return real_write_text(self, data, *args, **kwargs)


Path.write_text = torn_write_text
model = build_model(tiny_config(), seed=0)
params = list(model.language_model.model.mm_projector.parameters())
train(model, params, [0, 1, 2], lambda samples: samples, lambda batch: {"loss": sum(p.square().sum() for p in params)},
      TrainConfig(lr=1e-3, max_steps=int(sys.argv[2]), save_every=1, device="cpu"), sys.argv[1], resume=True)
"""


def test_a_resume_killed_while_rewriting_the_log_keeps_the_runs_history(tmp_path):
    """A resume rewrites the loss log (dropping records past its checkpoint); killed meanwhile, it must leave the
    log whole, so that the next resume continues it (a torn log lost the records and stopped every later resume)."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    config = TrainConfig(lr=1e-3, max_steps=4, save_every=1, device="cpu")
    train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, config, tmp_path)
    before = read_log(tmp_path)
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_REWRITING_THE_LOG, str(tmp_path),
                           str(config.max_steps + 2)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 9, done.stderr[-3000:]  # killed inside the rewrite
    assert read_log(tmp_path) == before
    longer = replace(config, max_steps=config.max_steps + 2)
    result = train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, longer, tmp_path, resume=True)
    assert [r["step"] for r in result.records] == list(range(config.max_steps + 1, longer.max_steps + 1))
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, longer.max_steps + 1))


def test_save_total_limit_keeps_the_newest_checkpoints_and_the_run_resumes_from_them(tmp_path):
    """Every checkpoint was kept: a full-model run saving every few steps filled its disk (weights and the Adam
    moments in each). With the HF Trainer's save_total_limit only the newest stay, and folders a kill left torn go."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    config = TrainConfig(lr=1e-3, max_steps=3, save_every=1, device="cpu")
    train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, config, tmp_path)
    folders = sorted((tmp_path / CHECKPOINT_DIR).iterdir())
    assert len(folders) == config.max_steps  # 0 (the default): every checkpoint stays
    (folders[0] / STATE_FILE).unlink()  # as a kill while writing it would leave it
    longer = replace(config, max_steps=config.max_steps + 3, save_total_limit=2)  # a resume may change the limit
    result = train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, longer, tmp_path, resume=True)
    assert [r["step"] for r in result.records] == list(range(config.max_steps + 1, longer.max_steps + 1))
    kept = range(longer.max_steps - longer.save_total_limit + 1, longer.max_steps + 1)
    assert sorted(f.name for f in (tmp_path / CHECKPOINT_DIR).iterdir()) == [f"step-{n:07d}" for n in kept]
    again = train(model, params, [0, 1, 2], lambda samples: samples, loss_fn,
                  replace(longer, max_steps=longer.max_steps + 1), tmp_path, resume=True)
    assert [r["step"] for r in again.records] == [longer.max_steps + 1]  # resumed from the newest one kept


def test_the_save_of_a_run_stopped_by_an_unreadable_sample_keeps_to_save_total_limit(tmp_path):
    """The checkpoint saved when a sample cannot be read left the older ones in place: a run limited to one
    full-model checkpoint held two, and a disk sized for the limit filled at the resume's next save."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())
    config = TrainConfig(lr=1e-3, max_steps=5, save_every=2, save_total_limit=1, device="cpu")
    failing_step = config.save_every + 2  # a step after one periodic save, whose state is not saved yet
    calls = []

    def collate(samples):  # batch 1 x grad_accum 1: one call per step
        calls.append(samples)
        if len(calls) == failing_step:
            raise ValueError("cannot read this sample")
        return samples

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    with pytest.raises(ValueError, match=rf"step {failing_step}: cannot read this sample"):
        train(model, params, [0, 1, 2], collate, loss_fn, config, tmp_path)
    left = sorted(f.name for f in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert left == [f"step-{failing_step - 1:07d}"]


def test_a_checkpoints_files_reach_the_disk_before_the_state_that_marks_it_complete(tmp_path, monkeypatch):
    """Only the trainer state was flushed to disk: after a power loss the newest checkpoint could hold its state
    (so it counts as complete) with torn weights, and save_total_limit has removed the older ones by then."""
    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a descriptor's file")
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    monkeypatch.setattr(os, "fsync", recording_fsync)
    train(model, params, [0, 1, 2], lambda samples: samples, loss_fn,
          TrainConfig(lr=1e-3, max_steps=1, device="cpu"), tmp_path)
    folder = latest_checkpoint(tmp_path)
    # The state is written to a temporary beside it, flushed, then renamed into place (atomic_files).
    state_at = next(i for i, path in enumerate(synced)
                    if Path(path).parent == folder and Path(path).name.startswith(f".{STATE_FILE}."))
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != STATE_FILE]
    assert files and all(str(f) in synced[:state_at] for f in files), (files, synced[:state_at])


def test_a_damaged_loss_log_line_is_named(tmp_path):
    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match=rf"{tmp_path}/{LOG_FILE}: line 2 is not a loss record"):
        read_log(tmp_path)


def test_a_last_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path, caplog):
    """Killed while appending a step's record, a run leaves that record cut short with no newline; the resume stopped
    with 'line N is not a loss record ... remove it to resume'. That record's checkpoint is saved after the append,
    so the resume starts before it: the torn line is dropped with a warning and the log continues step by step."""
    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.square().sum() for p in params)}

    config = TrainConfig(lr=1e-3, max_steps=4, save_every=2, device="cpu")
    whole = train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, config, tmp_path).records
    # The state a kill in the last step's append leaves: its checkpoint and final/ not written, its line cut.
    shutil.rmtree(latest_checkpoint(tmp_path))
    shutil.rmtree(tmp_path / FINAL_DIR)
    lines = (tmp_path / LOG_FILE).read_text().splitlines(keepends=True)
    (tmp_path / LOG_FILE).write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    resumed_from = int(latest_checkpoint(tmp_path).name.removeprefix("step-"))
    with caplog.at_level(logging.WARNING, logger="medsight.train.loop"):
        result = train(model, params, [0, 1, 2], lambda samples: samples, loss_fn, config, tmp_path, resume=True)
    assert f"{tmp_path / LOG_FILE}: dropped line {len(lines)}" in caplog.text
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, config.max_steps + 1))
    assert [r["loss"] for r in read_log(tmp_path)] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    assert [r["step"] for r in result.records] == list(range(resumed_from + 1, config.max_steps + 1))


def test_a_torn_line_that_is_not_the_last_stays_an_error(tmp_path):
    """Only the end of the log is where a kill tears a record: a damaged line before a whole one is named."""
    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}')
    with pytest.raises(ValueError, match=rf"{tmp_path}/{LOG_FILE}: line 2 is not a loss record"):
        read_log(tmp_path)


def _assert_same_run(whole: Path, resumed: Path, steps: int) -> None:
    """The resumed run's final weights (a model, or a LoRA run's adapter and other trained tensors) and loss log
    equal the uninterrupted run's, exactly."""
    from medsight.model.adapter import ADAPTER_CONFIG, read_non_lora
    from medsight.model.checkpoints import read_safetensors_file
    from medsight.model.loading import load_pretrained

    def trained(final: Path) -> dict[str, torch.Tensor]:
        if not (final / ADAPTER_CONFIG).is_file():
            return load_pretrained(final).state_dict()
        return {**read_safetensors_file(final / "adapter_model.safetensors"), **read_non_lora(final)}

    want, got = trained(whole / FINAL_DIR), trained(resumed / FINAL_DIR)
    assert want.keys() == got.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0
    losses = [[r["loss"] for r in read_log(out)] for out in (whole, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == steps


def _assert_stops_keeping_its_steps_then_resumes(tmp_path: Path, run, failing_step: int, damage, mend, refusal,
                                                 steps: int) -> None:
    """The run "whole" ends; "broken", with `damage()` done first, stops at `failing_step` with the ValueError
    `refusal(kept)` (a pattern) and keeps the state after the step before in `kept`; after `mend()` its resume ends
    exactly as "whole" did. `run(out, *extra)` runs the stage into tmp_path / out."""
    assert run("whole") == 0
    damage()
    kept = tmp_path / "broken" / CHECKPOINT_DIR / f"step-{failing_step - 1:07d}"
    with pytest.raises(ValueError, match=refusal(kept)):
        run("broken")
    assert latest_checkpoint(tmp_path / "broken") == kept
    mend()
    assert run("broken", "--resume") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "broken", steps)


def _run_with_a_sample_at_step(tmp_path, command: str, step: int, settings: dict | None = None):
    """A 4-step `command` run on synthetic data, one sample per step: its config, the data's items, the index and
    image file of the sample `step` reads, and `run(out, *extra)` launching it into tmp_path/out."""
    import json

    from medsight.train.cli import main as train_main
    from medsight.train.loop import SampleOrder
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())
    config = {"init_from": "tiny", "max_steps": 4, "grad_accum": 1, "save_every": 100, **(settings or {})}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    index = SampleOrder(len(items), TrainConfig.seed)[step - 1]  # batch 1 x grad_accum 1: one per step

    def run(out: str, *extra: str) -> int:
        return train_main([command, "--config", str(tmp_path / "cfg.json"), "--data", str(data["lvlm"]),
                           "--out", str(tmp_path / out), *extra])

    return config, items, index, data["root"] / items[index]["image"], run


def test_a_sample_damaged_mid_run_is_named_and_the_steps_before_it_are_kept(tmp_path):
    """An image damaged after the up-front checks (which see that the file is there) failed when its step read it:
    the error named the file but not the item, and the steps since the last checkpoint were lost. The step's samples
    are read before it computes: the error names step, item and file, the state after the last step is saved, and a
    resume once the file is whole ends exactly as an uninterrupted run."""
    failing_step = 3
    config, items, index, image, run = _run_with_a_sample_at_step(tmp_path, "stage3", failing_step)
    whole = image.read_bytes()

    _assert_stops_keeping_its_steps_then_resumes(
        tmp_path, run, failing_step, lambda: image.write_bytes(whole[: len(whole) // 2]),
        lambda: image.write_bytes(whole),
        lambda kept: (rf"step {failing_step}: .*train\.json: item {index} \(id {items[index]['id']!r}\): cannot read "
                      rf"the image {image}: .*; the run's state after step {failing_step - 1} is saved in {kept}: "
                      r"replace the file"),
        config["max_steps"])


def test_a_lora_run_resumes_from_its_adapter_checkpoint_as_if_uninterrupted(tmp_path):
    """A LoRA run's step checkpoint holds only what the run trains (its adapter, non_lora_trainables.bin) and the
    trainer state; the resume rebuilds the frozen base from init_from, checks it is the run's (the fingerprint in
    the checkpoint) and ends exactly as an uninterrupted run. So does the resume of a checkpoint in the earlier
    whole-model form, and one on another base is refused."""
    import json

    from medsight.model.adapter import ADAPTER_CONFIG, BASE_FILE, NON_LORA_FILE
    from medsight.model.checkpoints import CheckpointError
    from medsight.model.loading import save_pretrained
    from medsight.train.cli import initial_model
    from medsight.train.stages import LoraConfig, add_lora_for_training

    failing_step = 3
    config, _, _, image, run = _run_with_a_sample_at_step(tmp_path, "lora", failing_step, {"lr": 1e-2})
    whole = image.read_bytes()

    def keep_copies() -> None:
        image.write_bytes(whole)
        for name in ("old-format", "other-base"):
            shutil.copytree(tmp_path / "broken", tmp_path / name)

    _assert_stops_keeping_its_steps_then_resumes(
        tmp_path, run, failing_step, lambda: image.write_bytes(whole[: len(whole) // 2]), keep_copies,
        lambda kept: rf"step {failing_step}: .*cannot read the image .*; the run's state after step "
                     rf"{failing_step - 1} is saved in {kept}", config["max_steps"])
    kept = tmp_path / "broken" / CHECKPOINT_DIR / f"step-{failing_step - 1:07d}"
    assert (kept / ADAPTER_CONFIG).is_file() and not list(kept.glob("model*.safetensors"))

    # The same state in the whole-model form a step checkpoint had before: the model with its LoRA layers.
    old = tmp_path / "old-format" / CHECKPOINT_DIR / kept.name
    lora_config = LoraConfig.from_json(tmp_path / "cfg.json")
    model = initial_model(lora_config)
    peft_model, _, non_lora = add_lora_for_training(model, lora_config)
    from medsight.model.adapter import base_fingerprint, restore_adapter

    fingerprint = json.loads((old / BASE_FILE).read_text())["weights_fingerprint"]
    restore_adapter(peft_model, old, non_lora, fingerprint, "tiny")
    for name in (ADAPTER_CONFIG, "adapter_model.safetensors", NON_LORA_FILE, BASE_FILE):
        (old / name).unlink()
    save_pretrained(model, old)
    assert run("old-format", "--resume") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "old-format", config["max_steps"])

    # A base other than the run's: its record in the checkpoint refuses it, naming both.
    other = tmp_path / "other-base" / CHECKPOINT_DIR / kept.name
    record = json.loads((other / BASE_FILE).read_text())
    record["weights_fingerprint"] = base_fingerprint(build_model(tiny_config(), seed=TrainConfig.seed + 1))
    (other / BASE_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=rf"the adapter {other} was trained on a base model .* has other"):
        run("other-base", "--resume")


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_a_mask_of_another_size_mid_run_is_named_and_the_steps_before_it_are_kept(tmp_path, stage):
    """One image's masks are stacked into one tensor: a mask replaced mid-run by one of another size made
    `torch.stack` raise a RuntimeError, which neither the dataset nor the step's reader caught, so the run died
    without naming the item or files and lost the steps since the last checkpoint. Now a ValueError names the step,
    the item and both files with their sizes, the state after the last step is saved, and a resume once the file is
    whole ends exactly as an uninterrupted run."""
    import json

    import numpy as np
    from PIL import Image

    from medsight.tokens import CODE_PATTERN
    from medsight.train.cli import main as train_main
    from medsight.train.loop import SampleOrder
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    root = data["root"]
    segmentation = stage == "stage1"
    if segmentation:  # a second annotation of each image of the first source, with a copy of its mask
        meta = json.loads(data["meta"].read_text())
        doc_path = root / meta["json_paths"][0]
        doc = json.loads(doc_path.read_text())
        mask_root = root / meta["mask_roots"][0]
        for ann in list(doc["annotations"]):
            copy = ann["mask_file"].replace(".png", "_copy.png")
            shutil.copy(mask_root / ann["mask_file"], mask_root / copy)
            doc["annotations"].append({**ann, "id": len(doc["annotations"]), "mask_file": copy})
        doc_path.write_text(json.dumps(doc))
        items = doc["images"]  # the dataset's records: this source's images first, in image_id order
        data_path, count = data["meta"], len(items) * len(meta["json_paths"])
    else:  # every item with a mask gets a second region code and a copy of its mask
        items = json.loads(data["lvlm"].read_text())
        for item in items:
            for mid in list(item["mask_orders"]):
                copy = f"{mid}_copy"
                item["mask_files"][copy] = item["mask_files"][mid].replace(mid, copy)
                shutil.copy(root / item["mask_files"][mid], root / item["mask_files"][copy])
                item["mask_orders"].append(copy)
                code = CODE_PATTERN.search(item["conversations"][-1]["value"]).group(0)
                item["conversations"][-1]["value"] += f" Again {code}."
        data["lvlm"].write_text(json.dumps(items))
        data_path, count = data["lvlm"], len(items)
    config = {"init_from": "tiny", "max_steps": 4, "batch_size": 1, "grad_accum": 1, "save_every": 100}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    order = SampleOrder(count, TrainConfig.seed)
    # The first step (after the first) whose sample has two masks: batch 1 x grad_accum 1, one sample per step.
    failing_step = next(s for s in range(2, config["max_steps"] + 1)
                        if order[s - 1] < len(items) and (segmentation or len(items[order[s - 1]]["mask_orders"]) == 2))
    index = order[failing_step - 1]
    if segmentation:
        where = rf"{doc_path.name}: image_id {index}"
        first, second = (mask_root / a["mask_file"] for a in doc["annotations"] if a["image_id"] == index)
    else:
        where = rf"train\.json: item {index} \(id {items[index]['id']!r}\)"
        first, second = (root / items[index]["mask_files"][m] for m in items[index]["mask_orders"])
    whole = second.read_bytes()
    height, width = np.asarray(Image.open(first)).shape[:2]

    def run(out: str, *extra: str) -> int:
        return train_main([stage, "--config", str(tmp_path / "cfg.json"), "--data", str(data_path),
                           "--out", str(tmp_path / out), *extra])

    _assert_stops_keeping_its_steps_then_resumes(
        tmp_path, run, failing_step, lambda: Image.fromarray(np.zeros((height + 1, width + 2), np.uint8)).save(second),
        lambda: second.write_bytes(whole),
        lambda kept: (rf"step {failing_step}: .*{where}: masks of one image differ in size: {first} is "
                      rf"{width}x{height} pixels, {second} is {width + 2}x{height + 1}; .*the run's state after step "
                      rf"{failing_step - 1} is saved in {kept}"),
        config["max_steps"])


def test_a_resume_on_data_of_another_size_is_refused(tmp_path):
    """The sample order is a permutation of the data set's size: a resume given another --data file (or one with
    items added or removed) trained on another stream of samples without a word. Refused, the run untouched."""
    import json

    from medsight.train.cli import main as train_main
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(items[:-1]))
    out = tmp_path / "run"

    def run(steps: int, conversations, *extra: str) -> int:
        config = tmp_path / f"cfg{steps}.json"
        config.write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "grad_accum": 1, "save_every": 1,
                                      "data_root": str(data["root"])}))
        return train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(out),
                           *extra])

    assert run(2, data["lvlm"]) == 0
    log = (out / LOG_FILE).read_text()
    with pytest.raises(ValueError, match=rf"cannot resume .*step-0000002: the run's training data held {len(items)} "
                                         rf"samples, --data now holds {len(items) - 1}"):
        run(3, fewer, "--resume")
    assert (out / LOG_FILE).read_text() == log and latest_checkpoint(out).name == "step-0000002"
    assert run(3, data["lvlm"], "--resume") == 0


def test_a_resume_on_data_of_the_same_size_but_other_content_is_refused(tmp_path):
    """Checkpoints recorded only the data set's size: a resume given another file of as many items (here every
    answer edited) continued the run on samples it never started with, without a word. The checkpoint now records a
    fingerprint of the data JSON's content: such a resume is refused naming both files, the run untouched; the same
    items written with other formatting resume; `--data-changed` continues on an edit made on purpose."""
    import json

    from medsight.train.cli import main as train_main
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())
    reformatted, edited = data["lvlm"].with_name("indented.json"), data["lvlm"].with_name("edited.json")
    reformatted.write_text(json.dumps(items, indent=2))
    # Every answer edited; an answer without its code keeps no mask (each code has its mask)
    edited.write_text(json.dumps([{**item, "conversations": [item["conversations"][0], {"from": "gpt", "value": "No."}],
                                   "mask_orders": []} for item in items]))
    out = tmp_path / "run"

    def run(steps: int, conversations: Path, *extra: str) -> int:
        config = tmp_path / f"cfg{steps}.json"
        config.write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "grad_accum": 1, "save_every": 1}))
        return train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(out),
                           *extra])

    assert run(1, data["lvlm"]) == 0
    assert run(2, reformatted, "--resume") == 0
    log = (out / LOG_FILE).read_text()
    with pytest.raises(ValueError, match=rf"cannot resume .*step-0000002: the run trained on {reformatted} \(content "
                                         rf"sha256 [0-9a-f]{{12}}\), --data now is {edited} \(content sha256 "
                                         r"[0-9a-f]{12}\): the same number of samples, other content"):
        run(3, edited, "--resume")
    assert (out / LOG_FILE).read_text() == log and latest_checkpoint(out).name == "step-0000002"
    with pytest.raises(ValueError, match="--data-changed applies to a resumed run"):
        run(3, edited, "--data-changed")
    assert run(3, edited, "--resume", "--data-changed") == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    with pytest.raises(ValueError, match=rf"the run trained on {edited} .* --data now is {data['lvlm']}"):
        run(4, data["lvlm"], "--resume")  # the run's data is now the edited file


def test_the_fingerprint_of_segmentation_data_covers_its_annotation_files(tmp_path):
    """Stages 1-2 read a meta JSON and the annotation files it names: an edited category in one of those is other
    data, as an edit of the meta itself is."""
    import json

    from medsight.train.data import SegmentationDataset
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")

    def fingerprint() -> str:
        return SegmentationDataset(data["meta"], 32, (0.5,) * 3, (0.5,) * 3).fingerprint

    before = fingerprint()
    annotations = json.loads((data["root"] / "ct.json").read_text())
    annotations["annotations"][0]["category_id"] = 1 - annotations["annotations"][0]["category_id"]
    (data["root"] / "ct.json").write_text(json.dumps(annotations))
    edited = fingerprint()
    meta = json.loads(data["meta"].read_text())
    data["meta"].write_text(json.dumps({**meta, "modality_labels": meta["modality_labels"][::-1]}))
    assert len({before, edited, fingerprint()}) == 3


def _grown_annotations(root: Path, copies: int, polygon_values: int) -> list[Path]:
    """The synthetic set's annotation files made large by a field the dataset never reads (COCO polygons): each
    annotation repeated `copies` times (other image ids) with a `polygon_values`-value segmentation."""
    import json

    meta = json.loads((root / "biomedparse_meta_train.json").read_text())
    files = [root / name for name in meta["json_paths"]]
    for path in files:
        doc = json.loads(path.read_text())
        doc["annotations"] = [{**ann, "image_id": f"{ann['image_id']}-{k}",
                               "segmentation": [[float(v) for v in range(polygon_values)]]}
                              for k in range(copies) for ann in doc["annotations"]]
        path.write_text(json.dumps(doc))
    return files


def test_the_segmentation_fingerprint_keeps_no_copy_of_the_annotation_files(tmp_path):
    """The fingerprint kept every annotation file in memory (and serialised each whole) until the data set was
    built: with large annotation files (polygons) the start of every run and rank held them all at once. Now each
    file is digested as it is read: the build's peak memory is about one parsed file, not all of them."""
    import tracemalloc

    from medsight.train.data import SegmentationDataset
    from medsight.user_files import read_user_json
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    files = _grown_annotations(data["root"], copies=40, polygon_values=400)
    assert len(files) >= 2
    tracemalloc.start()
    try:
        read_user_json(files[0], "annotation file")
        one_file = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        dataset = SegmentationDataset(data["meta"], 32, (0.5,) * 3, (0.5,) * 3)
        build = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(dataset) > 0
    assert build < 1.5 * one_file, (build, one_file, len(files))


def test_the_segmentation_fingerprint_covers_the_fields_read_not_the_others(tmp_path):
    """What identifies the data of stages 1-2 is what the data set reads: an edited mask file name is other data,
    an edited polygon or `info` (never read) is the same data and does not refuse a resume."""
    import json

    from medsight.train.data import SegmentationDataset
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    path = _grown_annotations(data["root"], copies=1, polygon_values=8)[0]

    def fingerprint() -> str:
        return SegmentationDataset(data["meta"], 32, (0.5,) * 3, (0.5,) * 3).fingerprint

    def edit(change) -> None:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))

    before = fingerprint()
    edit(lambda doc: doc["annotations"][0]["segmentation"][0].reverse())
    edit(lambda doc: doc.update(info={"description": "re-exported"}))
    assert fingerprint() == before
    masks = sorted({ann["mask_file"] for ann in json.loads(path.read_text())["annotations"]})
    assert len(masks) >= 2
    edit(lambda doc: doc["annotations"][0].update(mask_file=next(m for m in masks
                                                                 if m != doc["annotations"][0]["mask_file"])))
    assert fingerprint() != before


def test_the_conversation_fingerprint_covers_the_fields_read_not_the_others(tmp_path):
    """Stages 3-5 hashed each conversation item whole, where stages 1-2 hash only what is read: an edited id, or a
    field never read (a source, a note, a mask file no code orders), refused a resume as other data. Now what makes a
    sample (image, each turn's role and text, the ordered masks and their files) is the data, as for stages 1-2."""
    import json

    from medsight.train.data import ConversationDataset
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())

    def fingerprint(changed: list[dict]) -> str:
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(changed))
        return ConversationDataset(path, None, 32, (0.5,) * 3, (0.5,) * 3, data_root=data["root"]).fingerprint

    def edit(change) -> list[dict]:
        copy = json.loads(json.dumps(items))
        change(copy[0], copy[1])
        return copy

    masked = next(i for i, item in enumerate(items) if item["mask_orders"])
    other_file = items[masked - 1]["image"]  # a file that exists, as the mask of another item's code
    unread = [edit(lambda a, b: a.update(id="renamed")),
              edit(lambda a, b: a.update(source="BiomedParse", note={"checked": True})),
              edit(lambda a, b: a["conversations"][0].update(weight=2)),
              [{**item, "mask_files": {**(item["mask_files"] or {}), "unused": "elsewhere.png"}} for item in items]]
    read = [edit(lambda a, b: a["conversations"][-1].update(value="No.")),
            edit(lambda a, b: a.update(image=b["image"])),
            [{**item, "mask_files": {item["mask_orders"][0]: other_file}} if i == masked else item
             for i, item in enumerate(items)]]
    before = fingerprint(items)
    assert [fingerprint(changed) for changed in unread] == [before] * len(unread)
    after = [fingerprint(changed) for changed in read]
    assert before not in after and len(set(after)) == len(read)


def test_a_run_resumes_from_its_data_moved_to_another_disk(tmp_path):
    """`data_root` says where the files are, not what a step computes: a resume after moving the data was refused
    ("data_root: ... in the run, ... now"), leaving a new --out folder as the only way on. It now continues exactly:
    the moved run ends with the weights of an uninterrupted one."""
    import json

    from medsight.train.cli import main as train_main
    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    conversations = tmp_path / "train.json"  # outside the data folder: found through data_root only
    shutil.copy(data["lvlm"], conversations)

    def run(out: str, steps: int, root, *extra: str) -> int:
        config = tmp_path / f"{out}{steps}.json"
        config.write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "grad_accum": 1, "save_every": 1,
                                      "data_root": str(root)}))
        return train_main(["stage3", "--config", str(config), "--data", str(conversations),
                           "--out", str(tmp_path / out), *extra])

    assert run("whole", 3, data["root"]) == 0
    assert run("moved", 2, data["root"]) == 0
    moved = shutil.move(data["root"], tmp_path / "other-disk")
    assert run("moved", 3, moved, "--resume") == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "moved", 3)


def test_a_cuda_device_under_torchrun_is_each_process_gpu(monkeypatch):
    """`"device": "cuda"` under torchrun put every process on the current GPU and then failed in
    `torch.cuda.set_device(torch.device("cuda"))` ("Expected a torch.device with a specified index"); "cuda:0" put
    every process on GPU 0. "cuda" is now each process's GPU; another process's index is refused before CUDA is
    touched (so on this CPU-only machine too)."""
    from medsight.train.loop import resolve_device

    world, local_rank = 4, 1
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(ValueError, match=rf"device 'cuda:0' under torchrun: process {local_rank} of this computer "
                                         r"would train on GPU 0, as would every other"):
        resolve_device(TrainConfig(device="cuda:0"))
    from medsight.train.loop import process_device_name

    assert process_device_name("cuda", world, local_rank) == f"cuda:{local_rank}"
    assert process_device_name(f"cuda:{local_rank}", world, local_rank) == f"cuda:{local_rank}"
    assert process_device_name("cpu", world, local_rank) == "cpu"
    assert process_device_name("cuda", 1, 0) == "cuda"  # one process: as named


def test_a_diverged_step_stops_the_run_keeping_the_last_finite_state(tmp_path):
    """A step whose loss is not finite (lr too high, float16 overflow) trained on: stage 5 of the tiny model at lr 1e30
    logged nan from step 2 to the end, wrote nan weights into every checkpoint and final/, and save_total_limit
    removed the last finite checkpoint. Now the run stops before such a step updates anything, saving the state after
    the step before, and the error names the step and the loss."""
    from medsight.model.checkpoints import read_safetensors_folder
    from medsight.train.loop import SampleOrder

    model = build_model(tiny_config(), seed=0)
    params = list(model.language_model.model.mm_projector.parameters())
    data = list(range(4))
    diverges = 3
    config = TrainConfig(lr=1e-3, max_steps=len(data), save_every=1, save_total_limit=1, device="cpu")
    poison = SampleOrder(len(data), config.seed)[diverges - 1]  # batch 1: step n reads position n - 1

    def loss_fn(batch):
        loss = sum(p.square().sum() for p in params)
        return {"loss": loss * float("nan") if batch == [poison] else loss}

    with pytest.raises(ValueError, match=rf"step {diverges}: the loss is nan and the gradient norm nan: the run "
                                         rf"diverged .*state after step {diverges - 1} is saved in .*step-"
                                         rf"{diverges - 1:07d}"):
        train(model, params, data, lambda samples: samples, loss_fn, config, tmp_path / "run")
    assert [r["step"] for r in read_log(tmp_path / "run")] == list(range(1, diverges))
    kept = latest_checkpoint(tmp_path / "run")
    assert kept.name == f"step-{diverges - 1:07d}"
    saved = read_safetensors_folder(kept)
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    for name, value in model.state_dict().items():  # the model as the last finite step left it
        assert torch.equal(value, saved[name]), name
