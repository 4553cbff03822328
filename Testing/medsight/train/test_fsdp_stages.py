"""Stage 2 and LoRA under torchrun (`medsight train` on two CPU ranks, gloo, FSDP2) against single-process runs on
the same batches.

Stage 2 routes each sample to its modality's codebook, so in a step where the ranks' samples have different
modalities each rank leaves a different codebook without a gradient; FSDP2 reduce-scatters only the parameters
with a gradient, and the ranks' collectives then differ (codebook 0's gradient was summed into codebook 1's, or gloo
aborted). A codebook no rank uses in a step must stay untouched, as in one process (Adam's momentum moved it).
Both stages also create random parameters before training (the codebook, lora_A): every rank must draw
the same ones, or the sharded model is a patchwork of different initialisations. Each command is a fresh launch,
so nothing has seeded the RNG before those draws.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medsight.config import tiny_config
from medsight.model.loading import build_model, load_pretrained, save_pretrained
from medsight.train.data import SegmentationDataset
from medsight.train.loop import SampleOrder, read_log
from medsight.train.stages import LoraConfig, Stage2Config, find_segmentation_meta, run_stage2, run_stage5
from medsight_testing.torchrun import torchrun
from medsight_testing.train_data import write_synthetic

WORLD = 2
# Batch 1 per rank x 2 ranks = the single-process batch 1 x grad-accum 2 (same samples per step).
STAGE2 = Stage2Config(lr=3e-3, max_steps=4, batch_size=1, min_lr=0.0, seed=1, device="cpu")
LORA = LoraConfig(lr=1e-2, projector_lr=1e-3, max_steps=3, grad_accum=1, warmup_ratio=0.0, lora_dropout=0.0,
                  device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp_stages")
    data = write_synthetic(root / "data")
    start = save_pretrained(build_model(tiny_config(), seed=0), root / "start")
    return {"root": root, "data": data, "start": start}


def _torchrun_train(setup: dict, command: str, config) -> tuple[list[float], list[str]]:
    """`torchrun -m medsight.train.cli COMMAND` from the start model; (logged losses, lines printed)."""
    root = setup["root"]
    (root / f"{command}.json").write_text(json.dumps({**config.to_dict(), "init_from": str(setup["start"])}))
    out = root / command
    done = torchrun(WORLD, ["-m", "medsight.train.cli", command, "--config", str(root / f"{command}.json"), "--data",
                            str(setup["data"]["root"]), "--out", str(out)])
    return [r["loss"] for r in read_log(out)], done.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def stage2(setup) -> tuple[list[float], list[str]]:
    return _torchrun_train(setup, "stage2", STAGE2)


@pytest.fixture(scope="module")
def lora(setup) -> tuple[list[float], list[str]]:
    return _torchrun_train(setup, "lora", LORA)


def test_ranks_with_different_codebooks_train_stage2_like_one_process(setup, stage2, tmp_path):
    # The case under test happens: in some step the two ranks' samples route to different codebooks.
    start = load_pretrained(setup["start"])
    v = start.config.vision
    dataset = SegmentationDataset(find_segmentation_meta(setup["data"]["root"]), v.image_size, v.image_mean,
                                  v.image_std)
    order = SampleOrder(len(dataset), STAGE2.seed)
    modalities = [[dataset[order[step * WORLD + r]].modality for r in range(WORLD)]
                  for step in range(STAGE2.max_steps)]
    assert any(len(set(pair)) > 1 for pair in modalities), modalities
    # ... and in a later step no rank routes to a codebook that an earlier step trained.
    trained_before = [{m for pair in modalities[:i] for m in pair} for i in range(len(modalities))]
    assert any(trained_before[i] - set(pair) for i, pair in enumerate(modalities)), modalities
    single = run_stage2(start, setup["data"]["root"], replace(STAGE2, grad_accum=WORLD), tmp_path)
    want = [r["loss"] for r in single.records]
    print("sharded", stage2[0], "single", want, "modalities per step", modalities)
    assert len(stage2[0]) == STAGE2.max_steps
    for got, expected in zip(stage2[0], want, strict=True):
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (got, expected)


def test_lora_ranks_start_from_the_same_adapters(setup, lora, tmp_path):
    # lora_B starts at zero, so step 1 cannot tell; the later steps use lora_A.
    single = run_stage5(load_pretrained(setup["start"]), setup["data"]["lvlm"], replace(LORA, grad_accum=WORLD),
                        tmp_path)
    want = [r["loss"] for r in single.records]
    print("sharded", lora[0], "single", want)
    assert len(lora[0]) == LORA.max_steps
    for got, expected in zip(lora[0], want, strict=True):
        # lr 1e-2: Adam turns float rounding (sum of micro-batches vs reduce-scatter mean) into ~1e-5 differences.
        assert abs(got - expected) <= 1e-4, (got, expected)


def test_torchrun_prints_one_summary(setup, stage2, lora):
    for command, (losses, lines) in {"stage2": stage2, "lora": lora}.items():
        assert len(lines) == 1, lines  # every rank printed one, the others with "final": "None"
        summary = json.loads(lines[0])
        assert summary["final"] == str(setup["root"] / command / "final")
        assert summary["new_steps"] == len(losses) and summary["last_loss"] == losses[-1]


def _resumable_run(setup: dict, tmp_path, command: str, config, first: int):
    """`launch(out, world, *resume)`: a `command` run on `world` ranks (1: in this process) into `out`, its logged
    losses; `interrupted(name)`: a copy of the run in tmp_path/"run" as a kill after step `first`'s checkpoint leaves
    it (no final/, no later checkpoint, the log cut at that step)."""
    import shutil

    from medsight.train.cli import main as train_main
    from medsight.train.loop import FINAL_DIR, LOG_FILE, _checkpoint_folders

    def launch(out, world: int, *resume: str) -> list[float]:
        args = [command, "--config", str(config), "--data", str(setup["data"]["root"]), "--out", str(out), *resume]
        if world == 1:
            assert train_main(args) == 0
        else:
            torchrun(world, ["-m", "medsight.train.cli", *args])
        return [r["loss"] for r in read_log(out)]

    def interrupted(name: str):
        copy = shutil.copytree(tmp_path / "run", tmp_path / name)
        shutil.rmtree(copy / FINAL_DIR)
        complete, torn = _checkpoint_folders(copy)
        for step, folder in {**complete, **torn}.items():
            if step > first:
                shutil.rmtree(folder)
        log = copy / LOG_FILE
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:first]))
        return copy

    return launch, interrupted


def test_a_stage2_run_with_an_untrained_codebook_resumes_under_torchrun_and_in_one_process(setup, stage2, tmp_path):
    """Adam has no moments for a parameter no step has given a gradient (a codebook no sample was routed to yet; the
    perceiver's region_position_embed, which the forward never uses, in stage 1), but the resume's fresh optimizer
    asks for every parameter's: DCP refused the checkpoint ('Missing key in checkpoint state_dict'), under torchrun
    and in one process alike, so a stage-1 or stage-2 torchrun run could not be resumed at all. The moments saved
    load, the others stay absent: the resumed run logs the uninterrupted run's losses."""

    import torch.distributed.checkpoint as dcp

    from medsight.train.fsdp import SHARDED_DIR
    from medsight.train.loop import CHECKPOINT_DIR, latest_checkpoint

    first = STAGE2.max_steps // 2
    config = tmp_path / "stage2.json"
    config.write_text(json.dumps({**STAGE2.to_dict(), "save_every": first, "init_from": str(setup["start"])}))

    launch, interrupted = _resumable_run(setup, tmp_path, "stage2", config, first)

    assert launch(tmp_path / "run", WORLD) == stage2[0]
    checkpoint = tmp_path / "run" / CHECKPOINT_DIR / f"step-{first:07d}" / SHARDED_DIR
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    codebook = build_model(tiny_config()).attach_codebook()
    without = [n for n, _ in codebook.named_parameters() if f"optimizer.model.codebook.{n}.exp_avg" not in saved]
    assert without, "every codebook had a gradient in the first steps: the case under test does not happen"
    assert launch(interrupted("two"), WORLD, "--resume") == stage2[0]
    one = interrupted("one")
    assert len(launch(one, 1, "--resume")) == STAGE2.max_steps  # on: its global batch is one rank's
    assert latest_checkpoint(one).name == f"step-{STAGE2.max_steps:07d}"


def test_a_lora_torchrun_checkpoint_holds_only_what_it_trains_and_resumes_exactly(setup, lora, tmp_path):
    """A LoRA run's torchrun checkpoints held the whole model's shards, frozen base included, and no adapter. They
    now hold the trained tensors' shards (and their Adam moments) and, gathered on rank 0, the adapter in final/'s
    layout (`--adapter` takes it); the resume under torchrun logs the uninterrupted run's losses and one in one
    process goes on to the end."""

    import torch
    import torch.distributed.checkpoint as dcp

    from medsight.model.adapter import ADAPTER_CONFIG, BASE_FILE
    from medsight.model.checkpoints import CheckpointError
    from medsight.model.loading import load_model
    from medsight.train.fsdp import SHARDED_DIR
    from medsight.train.loop import CHECKPOINT_DIR, FINAL_DIR, latest_checkpoint
    from medsight.train.stages import add_lora_for_training
    from medsight_testing.train_data import probe

    first = LORA.max_steps // 2
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({**LORA.to_dict(), "save_every": first, "init_from": str(setup["start"])}))

    launch, interrupted = _resumable_run(setup, tmp_path, "lora", config, first)

    assert launch(tmp_path / "run", WORLD) == lora[0]
    step = tmp_path / "run" / CHECKPOINT_DIR / f"step-{first:07d}"
    saved = dcp.FileSystemReader(str(step / SHARDED_DIR)).read_metadata().state_dict_metadata
    model = load_pretrained(setup["start"]).requires_grad_(False)  # as the run freezes it before LoRA goes in
    add_lora_for_training(model, LORA)
    trained = {"model.model." + n for n, p in model.named_parameters() if p.requires_grad}
    assert {k for k in saved if k.startswith("model.")} == trained
    assert (step / ADAPTER_CONFIG).is_file() and (step / BASE_FILE).is_file()
    last = tmp_path / "run" / CHECKPOINT_DIR / f"step-{LORA.max_steps:07d}"
    with torch.no_grad():
        want = probe(load_model(str(setup["start"]), device="cpu", adapter=tmp_path / "run" / FINAL_DIR),
                     setup["data"]["lvlm"])
        got = probe(load_model(str(setup["start"]), device="cpu", adapter=last), setup["data"]["lvlm"])
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert launch(interrupted("two"), WORLD, "--resume") == lora[0]
    one = interrupted("one")
    assert len(launch(one, 1, "--resume")) == LORA.max_steps  # on: its global batch is one rank's
    assert latest_checkpoint(one).name == f"step-{LORA.max_steps:07d}"
    other = interrupted("other-base")  # a checkpoint that records another base than the run's init_from
    record_file = other / CHECKPOINT_DIR / f"step-{first:07d}" / BASE_FILE
    record = json.loads(record_file.read_text())
    record["weights_fingerprint"] = "0" * 64
    record_file.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"was trained on a base model with weights fingerprint 000000000000"):
        launch(other, 1, "--resume")


def test_a_lora_torchrun_checkpoints_files_reach_the_disk_before_the_state_that_marks_it_complete(setup, tmp_path):
    """Rank 0 wrote the adapter files of a LoRA run's torchrun checkpoint (adapter_config.json, its weights,
    non_lora_trainables.bin, config.json) in place and then the trainer state that marks it complete, without
    flushing them (the DCP shards are flushed by DCP; one process flushes its checkpoint with sync_tree): after a
    power loss the newest checkpoint could count as complete without its adapter_config.json, so its resume read
    the shards as a whole model's and failed, and save_total_limit had removed the older ones."""
    import os
    from pathlib import Path

    from medsight.train.loop import CHECKPOINT_DIR, SHARDED_STATE_FILE

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a descriptor's file")
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({**LORA.to_dict(), "max_steps": 1, "init_from": str(setup["start"])}))
    log, out = tmp_path / "fsync", tmp_path / "run"
    torchrun(WORLD, [str(Path(__file__).with_name("fsync_worker.py")), str(log), "lora", "--config", str(config),
                     "--data", str(setup["data"]["root"]), "--out", str(out)])
    synced = (tmp_path / "fsync.rank0").read_text().splitlines()  # rank 0 writes the state file
    folder = out / CHECKPOINT_DIR / f"step-{1:07d}"
    # The state is written to a temporary beside it, flushed, then renamed into place (atomic_files).
    state_at = next(i for i, path in enumerate(synced)
                    if Path(path).parent == folder and Path(path).name.startswith(f".{SHARDED_STATE_FILE}."))
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != SHARDED_STATE_FILE]
    unsynced = [f.name for f in files if str(f) not in synced[:state_at]]
    assert files and not unsynced, unsynced
