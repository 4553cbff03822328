"""Files written whole or not at all (`medsight.atomic_files`), as the trainer's state files and an evaluation's
settings use them."""

from __future__ import annotations

import json

import pytest
import torch

from medsight import atomic_files
from medsight.train import state as trainer_state
from medsight_testing.disk import file_size_limit


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text('{"step": 1}')

    def torn(target):
        target.write_text('{"step": 2, "sch')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_files.replace_file(path, torn)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_write_failing_on_a_full_disk_names_the_file(tmp_path):
    """A write's OSError on a full disk names no file: `medsight eval` said only "error: File too large" when its
    report could not be written, naming neither the file nor the folder."""
    from medsight.commands.errors import error_message

    path = tmp_path / "report.json"
    text = '{"scores": [1, 2, 3]}'
    with file_size_limit(len(text) // 2), pytest.raises(OSError) as failed:
        atomic_files.replace_file(path, lambda target: target.write_text(text))
    assert error_message(failed.value) == f"{path}: File too large"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("save", ["write_json", "save_tensors"])
def test_trainer_state_reaches_the_disk_before_it_marks_a_checkpoint_complete(tmp_path, monkeypatch, save):
    """A checkpoint counts as complete once its state file is there; after a power loss a renamed but unflushed file
    can be empty. So the temporary file is flushed before the rename, and the folder's entry after it."""
    events = []
    real_fsync, real_replace = atomic_files.os.fsync, atomic_files.os.replace

    def fsync(handle):
        events.append("fsync")
        real_fsync(handle)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    monkeypatch.setattr(atomic_files.os, "replace", replace)
    path = tmp_path / "state"
    data = {"step": 3} if save == "write_json" else {"step": torch.tensor(3)}
    getattr(trainer_state, save)(path, data)
    assert events[:2] == ["fsync", "rename"], events
    assert "fsync" in events[2:] or atomic_files.os.name == "nt", events  # the folder (not on Windows)
    loaded = trainer_state.read_json(path) if save == "write_json" else trainer_state.load_tensors(path)
    assert int(loaded["step"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
