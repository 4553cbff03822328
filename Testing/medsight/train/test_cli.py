"""The torchrun entry point of `medsight train` (`torchrun ... -m medsight.train.cli`): a reader that leaves and
Ctrl+C end it as they end `medsight`, not with a traceback from every rank and torchrun's failure report."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from medsight.train.loop import FINAL_DIR
from medsight_testing.torchrun import interrupt_torchrun, torchrun_command
from medsight_testing.train_data import write_synthetic

WORLD = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("data"))


def stage1(data: dict[str, Path], out: Path, steps: int) -> list[str]:
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "batch_size": 1, "device": "cpu"}))
    return ["-m", "medsight.train.cli", "stage1", "--config", str(config), "--data", str(data["root"]), "--out",
            str(out)]


def test_a_reader_that_left_ends_a_torchrun_run_quietly(data, tmp_path):
    """`torchrun ... | head -0`: rank 0's summary line met a closed pipe; its BrokenPipeError traceback and torchrun's
    ChildFailedError report followed a run that had written everything (exit 1). Now nothing, and 0."""
    command, env = torchrun_command(WORLD, stage1(data, tmp_path / "run", 2))
    read_end, write_end = os.pipe()
    process = subprocess.Popen(command, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    os.close(read_end)  # before anything is written: the summary line is the only stdout
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert (tmp_path / "run" / FINAL_DIR / "model.safetensors").is_file()


def _marked_processes(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (those a command started, however deep)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours
            pass
    return found


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_under_torchrun_is_one_line_not_a_traceback_per_rank(data, tmp_path, monkeypatch, workers):
    """Ctrl+C reaches every process of the terminal's foreground group: each rank printed its KeyboardInterrupt
    traceback (or gloo's 'Connection closed by peer' and then that), 136 lines for 2 ranks. Now rank 0 says
    "interrupted" once. (torchrun's own agent still prints the SignalException it ends with: not ours to change.)
    With DataLoader workers (2 per rank) no worker prints either, and none is left running."""
    marker = f"MEDSIGHT_TEST_RUN={tmp_path.name}"
    monkeypatch.setenv(*marker.split("="))
    args = [*stage1(data, tmp_path / "run", 10_000), "--num-workers", str(workers)]
    err = interrupt_torchrun(WORLD, args, started=b"step 1/")  # training
    from_ranks = [line for line in err.splitlines() if line.startswith("[rank")]
    assert err.count("medsight train: interrupted") == 1 and not from_ranks, err
    assert "KeyboardInterrupt" not in err, err
    assert not any(worker in err for worker in ("DataLoader", "forkserver", "multiprocessing/process.py")), err
    deadline = time.monotonic() + 30  # workers notice a parent gone within seconds (the DataLoader's watchdog)
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _marked_processes(marker)


def test_a_sample_one_rank_cannot_read_stops_every_rank_and_keeps_the_steps_trained(tmp_path):
    """Under torchrun the rank that could not read its sample raised alone (the other failed in the step's
    collectives) and the steps since the last checkpoint were lost. Every rank now stops before the step computes;
    the state after the last step is saved (DCP, collectively), and the error names the step, item and file."""
    from medsight.train.loop import CHECKPOINT_DIR, SHARDED_STATE_FILE, SampleOrder, TrainConfig

    data = write_synthetic(tmp_path / "data")
    items = json.loads(data["lvlm"].read_text())
    failing_step, rank = 2, 1
    index = SampleOrder(len(items), TrainConfig.seed)[(failing_step - 1) * WORLD + rank]  # batch 1, grad_accum 1
    image = data["root"] / items[index]["image"]
    image.write_bytes(image.read_bytes()[:200])
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"init_from": "tiny", "max_steps": 3, "grad_accum": 1, "device": "cpu"}))
    out = tmp_path / "run"
    command, env = torchrun_command(WORLD, ["-m", "medsight.train.cli", "stage3", "--config", str(config), "--data",
                                            str(data["lvlm"]), "--out", str(out)])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode != 0
    assert (f"step {failing_step}: {data['lvlm']}: item {index} (id {items[index]['id']!r}): cannot read the image "
            f"{image}") in done.stderr, done.stderr[-3000:]
    assert (out / CHECKPOINT_DIR / f"step-{failing_step - 1:07d}" / SHARDED_STATE_FILE).is_file()
    # The rank that read its samples cannot know the cause (a bad file, or a data worker killed for memory): its line
    # points to the other's rather than telling the user to replace a file. torchrun ends the other ranks once one
    # exits, so that line is printed only when the rank gets there first (not in every run): checked when it is.
    others = [line for line in done.stderr.splitlines() if "another process could not read" in line]
    assert all("its own error says why" in line and "replace the file" not in line for line in others), (
        done.stderr[-3000:])


def test_stage4_from_a_stage4_output_does_not_reset_its_trained_code_rows(data, tmp_path):
    """init_code_embeddings (stage 4's default) writes the code rows from the codebook first. Started from a stage-4
    output (to train on), it threw away what that run had trained into them: 2 steps at lr 1e-2 had moved the rows
    0.0074 from their initial values, and the second run's rows were its own 2 steps from those values again. `final/`
    now says which stage wrote it, and such a start is refused before the model is loaded unless the option is off."""
    from medsight.train.cli import main as train_main

    def run(stage: str, init_from: str, out: str, **settings) -> int:
        config = tmp_path / f"{out}.json"
        config.write_text(json.dumps({"init_from": init_from, "max_steps": 1, "batch_size": 1, "grad_accum": 1,
                                      "device": "cpu", **settings}))
        source = data["root"] if stage == "stage2" else data["lvlm"]
        return train_main([stage, "--config", str(config), "--data", str(source), "--out", str(tmp_path / out)])

    assert run("stage2", "tiny", "s2") == 0
    assert run("stage3", str(tmp_path / "s2" / FINAL_DIR), "s3") == 0
    assert run("stage4", str(tmp_path / "s3" / FINAL_DIR), "s4") == 0
    trained = tmp_path / "s4" / FINAL_DIR
    with pytest.raises(ValueError, match=rf"init_from '{trained}' is the output of a stage4 run .*: its region-code "
                                         r"rows are trained, and init_code_embeddings would overwrite them"):
        run("stage4", str(trained), "again")
    assert not (tmp_path / "again").exists()
    from medsight.train.loop import TRAINED_BY_FILE

    assert json.loads((trained / TRAINED_BY_FILE).read_text()) == {"stage": "stage4", "steps": 1,
                                                                    "stages": ["stage2", "stage3", "stage4"]}
    assert run("stage4", str(trained), "again", init_code_embeddings=False) == 0


def test_stage4_from_a_stage4_step_checkpoint_or_official_export_is_refused_too(data, tmp_path):
    """The refusal above read `final/trained_by.json` only: a stage-4 run's step checkpoints and `final_official/`
    had no record, and a stage-4 run started from one of them silently reset its trained code rows. Every model
    folder a run writes now records its stage."""
    from medsight.train.cli import main as train_main
    from medsight.train.loop import CHECKPOINT_DIR, OFFICIAL_DIR, TRAINED_BY_FILE

    def run(stage: str, init_from: str, out: str, **settings) -> int:
        config = tmp_path / f"{out}.json"
        config.write_text(json.dumps({"init_from": init_from, "max_steps": 2, "batch_size": 1, "grad_accum": 1,
                                      "save_every": 1, "device": "cpu", **settings}))
        source = data["root"] if stage == "stage2" else data["lvlm"]
        return train_main([stage, "--config", str(config), "--data", str(source), "--out", str(tmp_path / out)])

    assert run("stage2", "tiny", "s2") == 0
    assert run("stage3", str(tmp_path / "s2" / FINAL_DIR), "s3") == 0
    assert run("stage4", str(tmp_path / "s3" / FINAL_DIR), "s4", export_official=True) == 0
    step = tmp_path / "s4" / CHECKPOINT_DIR / "step-0000001"
    stages = ["stage2", "stage3", "stage4"]
    assert json.loads((step / TRAINED_BY_FILE).read_text()) == {"stage": "stage4", "steps": 1, "stages": stages}
    assert json.loads((tmp_path / "s4" / OFFICIAL_DIR / TRAINED_BY_FILE).read_text()) == {"stage": "stage4",
                                                                                          "steps": 2,
                                                                                          "stages": stages}
    with pytest.raises(ValueError, match=rf"init_from '{step}' is the output of a stage4 run .*: its region-code "
                                         r"rows are trained, and init_code_embeddings would overwrite them"):
        run("stage4", str(step), "again")
    assert not (tmp_path / "again").exists()


def test_a_refusal_under_torchrun_is_printed_once_and_every_rank_fails(data, tmp_path):
    """Every rank runs the checks before training: a refused config was printed once per rank (2 identical lines
    for 2 ranks). Now one line; the run still fails."""
    config = tmp_path / "cfg.json"
    too_big = len(json.loads(data["lvlm"].read_text())) + 1  # one step would read more samples than the data holds
    config.write_text(json.dumps({"init_from": "tiny", "max_steps": 1, "batch_size": too_big, "device": "cpu"}))
    command, env = torchrun_command(WORLD, ["-m", "medsight.train.cli", "stage3", "--config", str(config), "--data",
                                            str(data["lvlm"]), "--out", str(tmp_path / "run")])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if line.startswith("medsight train: error:")]
    assert len(refusals) == 1 and f"batch_size {too_big} x grad_accum" in refusals[0], done.stderr[-3000:]


def test_a_start_from_a_later_stage_or_past_a_skipped_one_is_refused_naming_the_way_out(data, tmp_path):
    """Only stage 4's reset of trained code rows was judged: stage 2 from a stage-4 output (retraining the codebook
    its code rows were derived from), stage 4 from a stage-2 output (mm_projector never trained: stage 4 keeps it
    frozen) and stage 5 or LoRA from a stage-3 output (the code rows never initialised; LoRA keeps them) all trained
    and wrote a model without a word. They are refused before anything is built, naming the start to use;
    `--any-start` trains from it anyway."""
    from medsight.train.cli import main as train_main

    def run(stage: str, start: str, out: str, *extra: str) -> int:
        config = tmp_path / f"{out}.json"
        config.write_text(json.dumps({"init_from": start, "max_steps": 1, "batch_size": 1, "grad_accum": 1,
                                      "device": "cpu"}))
        source = data["root"] if stage in ("stage1", "stage2") else data["lvlm"]
        return train_main([stage, "--config", str(config), "--data", str(source), "--out", str(tmp_path / out),
                           *extra])

    final = {}
    for stage, start in (("stage2", "tiny"), ("stage3", "stage2"), ("stage4", "stage3")):  # the recipe's order
        assert run(stage, final.get(start, start), stage) == 0
        final[stage] = str(tmp_path / stage / FINAL_DIR)
    refused = {("stage2", "stage4"): r"stage 2 would retrain the codebook under the parts stage 4 trained on top "
                                     r"of it\. Start from the final/ of a stage-1 run, or from a stage-2 output",
               ("stage4", "stage2"): r"stage 4 would skip stage 3, which trains mm_projector\. Start from the final/ "
                                     r"of a stage-3 run",
               ("stage5", "stage3"): r"stage 5 would skip stage 4, which trains token_projection and the region-code "
                                     r"rows .*Start from the final/ of a stage-4 run",
               ("lora", "stage3"): r"stage 5 would skip stage 4",
               ("stage1", "stage3"): r"stage 1 would retrain the Region Perceiver under the parts stages 2-3 trained"}
    for (stage, start), reason in refused.items():
        out = f"{stage}-from-{start}"
        with pytest.raises(ValueError, match=rf"init_from '{final[start]}' is the output of a {start} run .*: "
                                             rf"{reason}.*pass --any-start"):
            run(stage, final[start], out)
        assert not (tmp_path / out).exists()
    assert run("lora", final["stage3"], "lora-any", "--any-start") == 0


def test_the_allowed_stage3_from_stage1_shortcut_reaches_stage4_without_any_start(data, tmp_path):
    """Stage 3 may start from a stage-1 output (it does not use the codebook), but trained_by.json kept only the last
    stage: stage 2 on that stage-3 output was refused as retraining the codebook "under the parts stage 3 trained on
    top of it" (stage 3 trains nothing on the codebook), and with --any-start stage 4 on the stage-2 output was
    refused as skipping stage 3, which had run. Each model folder now lists the stages it went through and a start is
    judged against them; a record from before the list (its last stage only) is still read."""
    from medsight.train.cli import main as train_main
    from medsight.train.loop import TRAINED_BY_FILE

    def run(stage: str, start: str, out: str) -> int:
        config = tmp_path / f"{out}.json"
        config.write_text(json.dumps({"init_from": start, "max_steps": 1, "batch_size": 1, "grad_accum": 1,
                                      "device": "cpu"}))
        source = data["root"] if stage in ("stage1", "stage2") else data["lvlm"]
        return train_main([stage, "--config", str(config), "--data", str(source), "--out", str(tmp_path / out)])

    chain = ("stage1", "stage3", "stage2", "stage4")
    start = "tiny"
    for stage in chain:
        assert run(stage, start, stage) == 0
        start = str(tmp_path / stage / FINAL_DIR)
    record = json.loads((tmp_path / "stage4" / FINAL_DIR / TRAINED_BY_FILE).read_text())
    assert record["stage"] == chain[-1] and record["stages"] == list(chain)
    # Stage 3 now sits under stage 4's code rows: retraining it from the chain's end is refused, naming stage 4 only.
    with pytest.raises(ValueError, match=r"went through stage1, stage3, stage2, stage4\): stage 3 would retrain "
                                         r"mm_projector under the parts stage 4 trained on top of it"):
        run("stage3", start, "stage3-again")
    # A record from before the list: only its last stage is known, and stage 2 on a stage-3 output is fine.
    old = tmp_path / "stage3" / FINAL_DIR
    (old / TRAINED_BY_FILE).write_text(json.dumps({"stage": "stage3", "steps": 1}))
    assert run("stage2", str(old), "stage2-from-old") == 0
    assert json.loads((tmp_path / "stage2-from-old" / FINAL_DIR / TRAINED_BY_FILE).read_text())["stages"] == [
        "stage3", "stage2"]


def test_an_empty_file_name_is_refused_not_taken_as_the_current_folder(data, tmp_path, monkeypatch, capsys):
    """`--out "$UNSET"`: argparse's Path turned "" into the current folder, and the run's checkpoints, final/ and
    log were written wherever the command was started (a stage-1 run did so and exited 0). Every file option of
    `medsight train` and `medsight train merge` now refuses an empty name, naming the option, before anything."""
    from medsight.train.cli import main as train_main
    from medsight.train.cli import merge_parser, parser

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"init_from": "tiny", "max_steps": 1, "batch_size": 1, "device": "cpu"}))
    started_in = tmp_path / "started-in"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    given = {"--config": str(config), "--data": str(data["root"]), "--out": str(tmp_path / "run"),
             "--adapter": str(tmp_path / "adapter"), "--model": "tiny"}
    for command, make_parser in ((["stage1"], parser), (["merge"], merge_parser)):
        options = {o for a in make_parser()._actions for o in a.option_strings}
        files = [o for o in ("--out", "--data", "--config", "--adapter") if o in options]
        required = [a.option_strings[0] for a in make_parser()._actions if a.required and a.option_strings]
        for emptied in files:
            argv = [*command, *[x for o in dict.fromkeys([*required, *files]) for x in (o, "" if o == emptied
                                                                                         else given[o])]]
            with pytest.raises(SystemExit) as stopped:
                train_main(argv)
            assert stopped.value.code == 2
            assert f"argument {emptied}: an empty name" in capsys.readouterr().err
    assert list(started_in.iterdir()) == []
