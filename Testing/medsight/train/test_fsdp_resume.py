"""A torchrun run resumed on another number of processes continues from the sample where it stopped.

Two CPU ranks train 2 steps (a checkpoint), then three ranks resume the same run to the end of its epoch. The
steps had read `step x batch x 2` samples; the resume must continue there (it restarted at `step x batch x 3`,
skipping samples) and count the steps left from the samples left.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from medsight.train.loop import SampleOrder, TrainConfig
from medsight_testing.torchrun import torchrun

WORKER = Path(__file__).with_name("fsdp_resume_worker.py")
NUM_SAMPLES = 12
FIRST, THEN = 2, 3  # processes before and after the interruption
FIRST_STEPS = 2


def _launch(world: int, out: Path, max_steps: int, resume: bool) -> None:
    torchrun(world, [str(WORKER), str(out), str(NUM_SAMPLES), str(max_steps), "1" if resume else "0"], timeout=300)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """The interrupted run both tests resume: FIRST processes, FIRST_STEPS steps (max_steps: the interruption after
    the checkpoint). Launched once; each test resumes its own copy."""
    out = tmp_path_factory.mktemp("first_run")
    _launch(FIRST, out, FIRST_STEPS, resume=False)
    return out


def _seen(out: Path, world: int) -> list[int]:
    return [i for r in range(world) for i in json.loads((out / f"seen-{world}-rank{r}.json").read_text())]


def test_resume_on_more_processes_reads_each_remaining_sample_once(first_run, tmp_path):
    batch = TrainConfig().batch_size
    shutil.copytree(first_run, tmp_path, dirs_exist_ok=True)
    _launch(THEN, tmp_path, 0, resume=True)  # to the end of the epoch
    consumed = FIRST_STEPS * batch * FIRST
    steps_left = math.ceil((NUM_SAMPLES - consumed) / (batch * THEN))
    assert json.loads((tmp_path / f"steps-{THEN}.json").read_text()) == list(
        range(FIRST_STEPS + 1, FIRST_STEPS + steps_left + 1))
    order = SampleOrder(NUM_SAMPLES, TrainConfig().seed)
    read = consumed + steps_left * batch * THEN
    assert sorted(_seen(tmp_path, FIRST)) == sorted(order[p] for p in range(consumed))
    assert sorted(_seen(tmp_path, THEN)) == sorted(order[p] for p in range(consumed, read))
    # Together: the whole epoch once, plus what the last step took from the next one.
    assert set(_seen(tmp_path, FIRST) + _seen(tmp_path, THEN)) == set(range(NUM_SAMPLES))


def test_a_torchrun_run_continues_in_one_process(first_run, tmp_path):
    """A sharded (DCP) checkpoint could only be resumed under torchrun with two or more processes: one process, with
    or without torchrun, was refused ("resume it the same way"), so a run whose GPUs dropped to one could not go on.
    It now continues in one process from the sharded weights and optimizer moments (Adam's step count goes on) and
    from the sample where the two processes stopped."""
    from medsight.train import state as trainer_state
    from medsight.train.loop import CHECKPOINT_DIR, STATE_FILE, latest_checkpoint

    batch = TrainConfig().batch_size
    shutil.copytree(first_run, tmp_path, dirs_exist_ok=True)
    _launch(1, tmp_path, 0, resume=True)  # to the end of the epoch
    consumed = FIRST_STEPS * batch * FIRST
    steps_left = math.ceil((NUM_SAMPLES - consumed) / batch)
    last = FIRST_STEPS + steps_left
    assert json.loads((tmp_path / "steps-1.json").read_text()) == list(range(FIRST_STEPS + 1, last + 1))
    order = SampleOrder(NUM_SAMPLES, TrainConfig().seed)
    assert _seen(tmp_path, 1) == [order[p] for p in range(consumed, consumed + steps_left * batch)]
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / CHECKPOINT_DIR / f"step-{last:07d}"
    moments = trainer_state.load_tensors(latest_checkpoint(tmp_path / "run") / STATE_FILE)["optimizer"]["state"]
    assert moments and {float(m["step"]) for m in moments.values()} == {float(last)}
