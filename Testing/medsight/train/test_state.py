"""Trainer state is read back without unpickling arbitrary objects (issue 19 point 12, issue 21 point 4)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight.config import tiny_config
from medsight.model.checkpoints import CheckpointError
from medsight.model.loading import build_model, save_pretrained
from medsight.train import state as trainer_state
from medsight.train.loop import CHECKPOINT_DIR, STATE_FILE, TrainConfig, train


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_rng_state_round_trips_through_plain_data():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = trainer_state.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    trainer_state.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected



def test_a_damaged_or_misplaced_json_state_file_is_named(tmp_path):
    """read_json let a non-UTF-8 file or a folder through as UnicodeDecodeError / IsADirectoryError tracebacks."""
    (tmp_path / "rng-rank0.json").write_bytes(b"\xff\xfe damaged")
    (tmp_path / "trainer_state.json").mkdir()
    cases = [("rng-rank0.json", r"cannot read the trainer state file .*rng-rank0\.json"),
             ("trainer_state.json", r"trainer_state\.json is a folder; expected the trainer state file"),
             ("absent.json", r"trainer state file not found: .*absent\.json")]
    for name, message in cases:
        with pytest.raises(CheckpointError, match=message):
            trainer_state.read_json(tmp_path / name)

def test_resume_refuses_a_state_file_with_objects(tmp_path):
    """A checkpoint whose trainer_state.pt carries a pickled object is refused, and the object never runs."""
    model = build_model(tiny_config(), seed=0)
    folder = save_pretrained(model, tmp_path / CHECKPOINT_DIR / "step-0000001")
    marker = tmp_path / "unpickled"
    torch.save({"step": 1, "optimizer": {}, "scheduler": {}, "rng": Payload(marker)}, folder / STATE_FILE)
    params = list(model.language_model.model.mm_projector.parameters())

    def loss_fn(batch):
        return {"loss": sum(p.sum() for p in params) * 0}

    config = TrainConfig(max_steps=2, device="cpu")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        train(model, params, [0, 1], lambda samples: samples, loss_fn, config, tmp_path, resume=True)
    assert not marker.exists()


KILLED_WHILE_SAVING = """
import io, os, sys
from pathlib import Path
import torch
from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.train.loop import TrainConfig, train

real_save, saves = torch.save, []


def torn_save(obj, target, *args, **kwargs):
    # The second trainer state: write half of its bytes where torch.save was asked to, then die (like a SIGKILL).
    saves.append(target)
    if len(saves) == 2:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        Path(target).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os._exit(9)
    return real_save(obj, target, *args, **kwargs)


torch.save = torn_save
model = build_model(tiny_config(), seed=0)
params = list(model.language_model.model.mm_projector.parameters())
train(model, params, [0, 1, 2], lambda samples: samples, lambda batch: {"loss": sum(p.square().sum() for p in params)},
      TrainConfig(max_steps=3, save_every=1, device="cpu"), sys.argv[1])
"""


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path):
    """A state file torn by a kill during the save must not mark its checkpoint complete."""
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 9, done.stderr[-3000:]
    assert (tmp_path / CHECKPOINT_DIR / "step-0000002").is_dir()  # killed inside the second checkpoint's save
    model = build_model(tiny_config(), seed=1)
    params = list(model.language_model.model.mm_projector.parameters())
    result = train(model, params, [0, 1, 2], lambda samples: samples,
                   lambda batch: {"loss": sum(p.square().sum() for p in params)},
                   TrainConfig(max_steps=3, save_every=1, device="cpu"), tmp_path, resume=True)
    assert [r["step"] for r in result.records] == [2, 3]
