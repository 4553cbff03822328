"""How a report folder's settings.json identifies a local model and is written: by the model files' names, sizes and
content (not their times, hidden files or a report folder inside), once, where hard links or pids cannot be
relied on."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from medsight.evaluate import provenance
from medsight.evaluate.provenance import check_settings, source_identity
from medsight.evaluate.readers import DataError
from medsight.evaluate.runner import RunOptions

SETTINGS = {"task": "vqa", "model": "demo", "model_weights": "embedded demo model", "sampling": "official"}


def _model(folder: Path) -> Path:
    """A model folder: a config and a 2 MiB safetensors file (large enough to be sampled, not hashed whole)."""
    folder.mkdir(parents=True)
    (folder / "medsight_config.json").write_text(json.dumps({"hidden_size": 64, "layers": 2}))
    save_file({"w": np.zeros((512, 1024), np.float32), "b": np.ones(8, np.float32)}, str(folder / "model.safetensors"))
    return folder


def _same_times(folder: Path) -> None:
    """Every file's modification time set to one value: what names, sizes and times alone cannot tell apart."""
    for f in folder.rglob("*"):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))


def test_copies_with_other_modification_times_are_the_same_model(tmp_path):
    folder = _model(tmp_path / "final")
    first = source_identity(str(folder))
    # Another node's copy (new times), and the original re-synced (times changed, contents not).
    copy = shutil.copytree(folder, tmp_path / "node1" / "final", copy_function=shutil.copyfile)
    for f in copy.iterdir():
        os.utime(f, ns=(5_000_000_000, 7_000_000_000))
    _same_times(folder)
    assert source_identity(str(copy)) == first
    assert source_identity(str(folder)) == first
    assert source_identity(str(folder / "model.safetensors")) == source_identity(str(copy / "model.safetensors"))


def test_a_report_folder_or_hidden_files_inside_the_model_folder_change_nothing(tmp_path):
    folder = _model(tmp_path / "final")
    report = folder / "reports" / "vqa"
    settings = provenance.answer_settings("vqa", str(folder), None, None, [RunOptions("vqa")], "float32", report)
    first = settings["model_weights"]
    report.mkdir(parents=True)
    check_settings(report, SETTINGS)
    (report / "predictions.jsonl").write_text('{"question_id": "q0"}\n')
    # Another evaluation's report folder in the model folder, and what editors and sync tools leave.
    other = folder / "reports" / "diagseg"
    other.mkdir()
    check_settings(other, SETTINGS)
    (other / "predictions.shard0-of-2.jsonl").write_text('{"question_id": "q0"}\n')
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("1")
    assert source_identity(str(folder), report) == first
    (report / "predictions.jsonl").write_text('{"question_id": "q0"}\n{"question_id": "q1"}\n')
    assert source_identity(str(folder), report) == first


@pytest.mark.parametrize("change", ["config", "dtype", "sampled bytes", "big file tail"])
def test_new_contents_of_the_same_size_and_time_are_another_model(tmp_path, change):
    folder = _model(tmp_path / "final")
    (folder / "vision.bin").write_bytes(bytes(3 << 20))
    _same_times(folder)
    first = source_identity(str(folder))
    if change == "config":
        (folder / "medsight_config.json").write_text(json.dumps({"hidden_size": 32, "layers": 2}))
    elif change == "dtype":  # same shapes and byte size, another dtype: only the safetensors header differs
        save_file({"w": np.zeros((512, 1024), np.int32), "b": np.ones(8, np.int32)}, str(folder / "model.safetensors"))
    elif change == "sampled bytes":  # retrained weights, same header
        save_file({"w": np.full((512, 1024), 0.5, np.float32), "b": np.ones(8, np.float32)},
                  str(folder / "model.safetensors"))
    else:  # a checkpoint's end (a zip's directory of CRCs)
        with open(folder / "vision.bin", "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"CRC!")
    _same_times(folder)
    assert source_identity(str(folder)) != first


def test_settings_are_recorded_where_hard_links_are_unsupported(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(provenance.os, "link", no_links)  # FUSE, SMB and FAT refuse hard links
    check_settings(tmp_path, SETTINGS)
    assert json.loads((tmp_path / "settings.json").read_text()) == SETTINGS
    check_settings(tmp_path, SETTINGS)  # a second shard compares
    with pytest.raises(DataError, match=r"other settings \(sampling: \"official\" there, \"greedy\" now\)"):
        check_settings(tmp_path, {**SETTINGS, "sampling": "greedy"})
    assert json.loads((tmp_path / "settings.json").read_text()) == SETTINGS  # the first writer's kept
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no temporary file left


def test_another_hosts_temporary_file_with_our_pid_is_left_alone(tmp_path):
    # Containers on two hosts sharing the folder can have the same pid.
    theirs = tmp_path / f".settings.json.{os.getpid()}.tmp"
    theirs.write_text('{"model": "theirs"}\n')
    check_settings(tmp_path, SETTINGS)
    assert theirs.read_text() == '{"model": "theirs"}\n'
    assert json.loads((tmp_path / "settings.json").read_text()) == SETTINGS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, "settings.json"])


def test_a_diagseg_folder_takes_the_sampled_vqa_run_added_later_and_records_its_seed(tmp_path):
    """A DiagSeg folder answered without --vqa-data records seed null (nothing sampled); rerun with --vqa-data, for the
    paper's recall, it was refused as "predictions made with other settings (seed: null there, 0 now)", though no
    answer of it depends on the seed. The seed is now recorded; another seed or sampling after that is refused."""
    from medsight.evaluate.provenance import answer_settings

    def settings(*options: RunOptions) -> dict:
        return answer_settings("diagseg", "demo", None, None, list(options), "float32")

    segmentation, recall = RunOptions("diagseg"), RunOptions("vqa")
    check_settings(tmp_path, settings(segmentation))
    (tmp_path / "predictions.jsonl").write_text('{"question_id": "1", "text": "yes"}\n')
    assert json.loads((tmp_path / "settings.json").read_text())["seed"] is None
    check_settings(tmp_path, settings(segmentation, recall))
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert recorded == settings(segmentation, recall) and recorded["seed"] == recall.seed
    check_settings(tmp_path, settings(segmentation, recall))  # the same again: resumed
    reseeded = [RunOptions(t, seed=recall.seed + 1) for t in ("diagseg", "vqa")]  # one --seed for both runs
    with pytest.raises(DataError, match=rf"other settings \(seed: {recall.seed} there, {recall.seed + 1} now\)"):
        check_settings(tmp_path, settings(*reseeded))
    fresh = tmp_path / "greedy"
    fresh.mkdir()
    check_settings(fresh, settings(segmentation))
    (fresh / "predictions.jsonl").write_text('{"question_id": "1", "text": "yes"}\n')
    greedy = [RunOptions(t, sampling="greedy") for t in ("diagseg", "vqa")]
    with pytest.raises(DataError, match=r"other settings \(sampling: \"official\" there, \"greedy\" now\)"):
        check_settings(fresh, settings(*greedy))
