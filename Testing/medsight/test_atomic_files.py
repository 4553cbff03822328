"""Files written whole or not at all (`medsight.atomic_files`), as the trainer's state files and an evaluation's
settings use them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

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


def test_a_folder_that_takes_no_file_is_named_with_the_file_not_its_temporary(tmp_path):
    """`medsight eval` rebuilding the report of a folder on a read-only share said "error: .../.report.json.
    937e10453a8e81be.tmp: Read-only file system", naming a hidden file the user never asked for."""
    from medsight.commands.errors import error_message

    path = tmp_path / "gone" / "report.json"  # as a read-only folder does, this one takes no new file
    with pytest.raises(OSError) as failed:
        atomic_files.replace_file(path, lambda target: target.write_text("{}"))
    assert error_message(failed.value) == f"{path}: No such file or directory"


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


#: A child that replaces an image and its labels sidecar (as `medsight ask --out F.nii` does), says "writing" once half
#: of the image is in its temporary file, then waits for a signal.
_WRITER = """
import importlib.util, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("atomic_files", sys.argv[2])  # standard library only: no torch to load
atomic_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic_files)
replace_files = atomic_files.replace_files

def half_then_wait(target):
    target.write_text("new image, half")
    print("writing", flush=True)
    sys.stdin.read()

folder = Path(sys.argv[1])
replace_files([(folder / "seg.nii", half_then_wait, ".nii"),
               (folder / "seg.json", lambda target: target.write_text("new labels"), "")])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_write_ended_by_sigterm_or_ctrl_c_keeps_the_old_files_and_leaves_no_temporary(tmp_path, signum):
    """SIGTERM (kill, a batch scheduler's time limit) killed the process at once, leaving a hidden half-written
    `.seg.nii.*.tmp.nii` beside the output; it now removes its temporary and still ends by SIGTERM. Ctrl+C did
    already (KeyboardInterrupt unwinds the stack)."""
    old = {"seg.nii": "old image", "seg.json": "old labels"}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), atomic_files.__file__],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout.readline() == "writing\n"
    assert len(list(tmp_path.glob(".seg.nii.*.tmp.nii"))) == 1  # the half-written temporary is there
    child.send_signal(signum)
    child.communicate()
    assert child.returncode == -signum  # still ended by the signal, as a parent (torchrun, Slicer) expects
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old


#: A child whose write gets SIGTERM, and a second one as the cleanup that starts removes a temporary (the audit event
#: os.remove comes before the file is removed): torchrun forwards SIGTERM to ranks a batch scheduler signalled too.
_TWICE = """
import importlib.util, os, signal, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("atomic_files", sys.argv[2])
atomic_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic_files)
sent = []

def again_as_cleanup_starts(event, args):
    if event == "os.remove" and not sent:
        sent.append(event)
        os.kill(os.getpid(), signal.SIGTERM)

def half_then_terminated(target):
    target.write_text("new image, half")
    sys.addaudithook(again_as_cleanup_starts)
    os.kill(os.getpid(), signal.SIGTERM)

folder = Path(sys.argv[1])
atomic_files.replace_files([(folder / "seg.json", lambda target: target.write_text("new labels"), ""),
                            (folder / "seg.nii", half_then_terminated, ".nii")])
"""


def test_a_second_sigterm_during_the_cleanup_does_not_leave_a_temporary(tmp_path):
    """The handler raised again for a second SIGTERM, inside the `except` removing the temporary: it stayed
    (`.seg.nii.*.tmp.nii`). The first SIGTERM is now the only one raised; the process still ends by SIGTERM."""
    old = {"seg.nii": "old image", "seg.json": "old labels"}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run([sys.executable, "-c", _TWICE, str(tmp_path), atomic_files.__file__], capture_output=True,
                          text=True)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old
