"""The one-command demo trainer (`python -m medsight.demo.train_demo --smoke`), its evaluation and the shipped model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medsight
from medsight.demo.evaluate_demo import dice, markdown, modality_correct, question_kind, summarise, yes_no
from medsight.demo.qa import PLACEHOLDER
from medsight.demo.train_demo import CARD_FILE, PHASES, _seconds_per_step
from medsight.train.data import read_rgb

pytest.importorskip("nilearn")  # the demo data builder needs the MNI152 template

CODE_TOKEN = re.compile(r"\[M\d+_\d+\]")
ASSET = Path(medsight.__file__).parent / "assets" / "demo_model"
MAX_MB = 30


def _mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_demo") / "run"
    proc = subprocess.run([sys.executable, "-m", "medsight.demo.train_demo", str(out), "--smoke", "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The one command, smoke-sized
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_runs_all_stages(smoke):
    out = smoke
    summary = json.loads((out / "summary.json").read_text())
    for phase in PHASES:
        assert summary["stages"][phase]["steps"] == 2
        assert (out / phase / "final" / "model.safetensors").is_file()
        assert (out / phase / "loss_log.jsonl").is_file()
    # The finish phase trains on stage 5's conversations plus their closed-question-only copies.
    stage5 = json.loads((out / "data" / "lvlm" / "train_stage5.json").read_text())
    finish = json.loads((out / "data" / "lvlm" / "train_finish.json").read_text())
    assert finish[: len(stage5)] == stage5 and len(finish) > len(stage5)
    assert all(it["id"].endswith("_closed") for it in finish[len(stage5):])
    assert {"dice_mean", "modality_accuracy", "yes_no_accuracy"} <= set(summary["scores"])
    assert summary["data_size"] == "tiny" and summary["seed"] == 3 and summary["data_seed"] == 0
    assert "--data-size tiny" in (out / "model" / CARD_FILE).read_text()  # the card names the command that made it
    # The language stages label the answers only (a named deviation): the saved settings say so.
    lvlm_phases = [phase for phase, stage in PHASES.items() if stage >= 3]
    assert lvlm_phases and all(
        json.loads((out / phase / "train_config.json").read_text())["label_prompt_markup"] is False
        for phase in lvlm_phases)


@pytest.mark.slow
def test_each_phase_records_the_weights_it_started_from(smoke):
    """Every phase's train_config.json said init_from "demo", which names the shipped trained model (what train
    would load for it), while the demo starts stage 1 from random weights and each later phase from the previous
    one's. Each now names the folder it started from: stage 1 the saved random weights (equal to the preset's at the
    run's seed), every later phase the previous phase's final folder."""
    from medsight.demo.train_demo import INIT_DIR, demo_model_config
    from medsight.model.loading import build_model, load_pretrained
    from medsight.train.cli import check_init_from

    out = smoke
    seed = json.loads((out / "summary.json").read_text())["seed"]
    configs = {phase: json.loads((out / phase / "train_config.json").read_text()) for phase in PHASES}
    names = list(PHASES)
    starts = [out / INIT_DIR, *(out / phase / "final" for phase in names[:-1])]
    assert [Path(configs[phase]["init_from"]) for phase in names] == starts
    for start in starts:
        check_init_from(str(start))  # train reads each as a model folder
    init = load_pretrained(out / INIT_DIR)
    rebuilt = build_model(demo_model_config(init.tokenizer), init.tokenizer, seed=seed).state_dict()
    got = init.state_dict()
    assert got.keys() == rebuilt.keys()
    assert max((got[k].float() - rebuilt[k].float()).abs().max().item() for k in got) == 0


@pytest.mark.slow
def test_resume_restarts_an_interrupted_phase(smoke, tmp_path):
    """--resume reuses finished phases and restarts one that was cut short (its folder holds a run but no final/),
    which the trainer alone would refuse to overwrite."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke, out)
    last = list(PHASES)[-1]
    shutil.rmtree(out / last / "final")  # killed before its end: log and checkpoints, no final/
    proc = subprocess.run([sys.executable, "-m", "medsight.demo.train_demo", str(out), "--smoke", "--seed", "3",
                           "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [p for p in PHASES if summary["stages"][p].get("skipped")] == list(PHASES)[:-1]
    # Without --resume the earlier run is refused at once, in one line, before the data is rebuilt.
    data_mtime = (out / "data" / "summary.json").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "medsight.demo.train_demo", str(out), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds an earlier demo run" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "data" / "summary.json").stat().st_mtime_ns == data_mtime
    assert summary["stages"][last]["steps"] == 2 and (out / last / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_smoke_fills_codes_from_the_codebook(smoke):
    out = smoke
    for split in ("train", "val", "test"):
        items = json.loads((out / "data" / "lvlm" / f"{split}_coded.json").read_text())
        for item in items:
            text = " ".join(t["value"] for t in item["conversations"])
            assert not PLACEHOLDER.search(text)
            assert len(CODE_TOKEN.findall(text)) == len(item["mask_orders"])
            for code in (item["mask_codes"] or {}).values():
                assert code.startswith(f"M{item['modality_label']}_")  # routed by the sample's modality label
    stats = json.loads((out / "data" / "lvlm" / "code_stats.json").read_text())
    assert stats["train"]["masks"] > 0


@pytest.mark.slow
def test_smoke_checkpoint_loads_and_answers_through_the_engine(smoke):
    out = smoke
    model_dir = out / "model"
    assert _mb(model_dir) <= MAX_MB
    card = (model_dir / CARD_FILE).read_text().lower()
    assert "not for clinical use" in card and "test split" in card
    engine = medsight.Engine(medsight.load_model(model_dir, device="cpu"))
    image = read_rgb(next((out / "data" / "cxr" / "images").glob("*.png")))
    answers = engine.ask([image], "Please segment the heart.", medsight.GenerationOptions(max_new_tokens=8))
    assert len(answers) == 1 and isinstance(answers[0].text, str)
    for name in ("report.md", "scores.json", "scores.png"):
        assert (out / "report" / name).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation helpers and the encoding cache (fast)
# ---------------------------------------------------------------------------------------------------------------
def test_question_kinds_and_answer_parsing():
    assert question_kind("What imaging modality is this?") == "modality"
    assert question_kind("Is there a lesion in the liver? Answer yes or no.") == "presence"
    assert question_kind("Is the heart visible in this image?") == "visible"
    assert question_kind("What is the main finding?") == "diagnosis"
    assert question_kind("Segment the liver and spleen.") == "segmentation"
    assert yes_no("Yes, there is a rounded pulmonary nodule, segmented as [M2_3].") == "yes"
    assert yes_no("Liver segmented as [M0_1]. No focal lesion is seen, so the answer is no.") == "no"
    assert yes_no("No.") == "no"
    assert yes_no("Nothing to say") is None
    assert modality_correct("This is a chest X-ray.", 2)
    assert not modality_correct("This is a chest X-ray.", 0)
    assert not modality_correct("This is an abdominal CT scan or a chest X-ray.", 0)


def test_dice_and_summary():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    assert dice(a, a) == 1.0 and dice(a, b) == pytest.approx(2 * 4 / 12)
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    records = [
        {"kind": "segmentation", "dice": 0.5, "dice_other": 0.7, "n_pred": 1, "structures": ["liver"],
         "modality_label": 0},
        {"kind": "modality", "correct": True, "modality_label": 1},
        {"kind": "presence", "correct": False, "modality_label": 2},
        {"kind": "visible", "correct": True, "modality_label": 2},
    ]
    s = summarise(records)
    assert s["dice_mean"] == 0.5 and s["modality_accuracy"] == 1.0 and s["yes_no_accuracy"] == 0.5
    assert "| liver | 0.500 | 1 |" in markdown(s)


# ---------------------------------------------------------------------------------------------------------------
# The shipped demo checkpoint
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="no shipped demo model")
def test_shipped_demo_model_loads_and_answers():
    assert _mb(ASSET) <= MAX_MB
    assert "not for clinical use" in (ASSET / CARD_FILE).read_text().lower()
    model = medsight.load_model(ASSET, device="cpu")
    assert model.config.name == "demo"
    image = np.zeros((112, 112, 3), np.uint8)
    answers = medsight.Engine(model).ask([image], "What imaging modality is this?",
                                         medsight.GenerationOptions(max_new_tokens=40))
    assert isinstance(answers[0].text, str)


# ---------------------------------------------------------------------------------------------------------------
# Several runs (seeds) in one model card
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_model_card_lists_earlier_runs_with_their_seeds(smoke, tmp_path):
    import shutil

    from medsight.demo.train_demo import collect_runs, run_entry, write_model_card

    out = smoke
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == [run_entry(summary)] and summary["runs"][0]["seed"] == summary["seed"]
    # Two earlier runs with other seeds and scores, then this one: the card has a row per run, in order.
    folders = []
    for seed, dice_mean in ((7, 0.831), (8, 0.845)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        earlier = {**summary, "seed": seed, "scores": {**summary["scores"], "dice_mean": dice_mean}}
        earlier["runs"] = [run_entry(earlier)]
        (folder / "summary.json").write_text(json.dumps(earlier))
        folders.append(folder)
    runs = collect_runs(folders)
    assert [(r["seed"], r["dice_mean"]) for r in runs] == [(7, 0.831), (8, 0.845)]
    assert collect_runs([folders[1], folders[1]]) == runs[1:]  # a run is listed once
    with pytest.raises(FileNotFoundError, match=r"summary\.json"):
        collect_runs([tmp_path])
    model_dir = tmp_path / "model"
    shutil.copytree(out / "model", model_dir)
    card = write_model_card(model_dir, {**summary, "runs": [*runs, run_entry(summary)]}).read_text()
    rows = [line for line in card.splitlines() if re.match(r"^\| \d", line)]
    assert [int(r.split("|")[1].split()[0]) for r in rows] == [7, 8, summary["seed"]]
    assert "| 0.831 |" in rows[0] and "| 0.845 |" in rows[1] and "(this checkpoint)" in rows[2]
    # An earlier run embedded after a later one: the card marks its own row, wherever it stands.
    first = json.loads((folders[0] / "summary.json").read_text())
    card = write_model_card(model_dir, {**first, "runs": [*runs, run_entry(summary)]}).read_text()
    rows = [line for line in card.splitlines() if re.match(r"^\| \d", line)]
    assert ["(this checkpoint)" in r for r in rows] == [True, False, False]
    # A rerun with the same seed is another run: only the checkpoint's own row is marked.
    rerun = {**summary, "scores": {**summary["scores"], "dice_mean": 0.5}}
    card = write_model_card(model_dir, {**summary, "runs": [run_entry(rerun), run_entry(summary)]}).read_text()
    rows = [line for line in card.splitlines() if re.match(r"^\| \d", line)]
    assert ["(this checkpoint)" in r for r in rows] == [False, True]
    assert "BPE tokenizer learned on the training conversations" in card


def test_answers_with_words_outside_the_training_answers_are_counted_per_kind():
    from medsight.demo.qa import answer_vocabulary, words

    train = [{"conversations": [{"from": "human", "value": "<image>\nWhat is the main finding?"},
                                {"from": "gpt", "value": "No abnormality is seen in this image."},
                                {"from": "human", "value": "Segment the liver."},
                                {"from": "gpt", "value": "Liver segmented as {code:ct_abdomen_train000_z001_liver}."}]}]
    vocabulary = answer_vocabulary(train)
    assert vocabulary == {"no", "abnormality", "is", "seen", "in", "this", "image", "liver", "segmented", "as"}
    answers = {"diagnosis": ["No abnormalivigesiseen in this image.", "No abnormality is seen in this image."],
               "segmentation": ["Liver segmented as [M0_3].", "Liver segmentedd as [M0_3]."]}
    records = [{"kind": kind, "answer": a, "unknown_words": sorted(words(a) - vocabulary), "modality_label": 0,
                "dice": 1.0, "dice_other": 1.0, "n_pred": 1, "structures": ["liver"], "correct": True}
               for kind, texts in answers.items() for a in texts]
    assert [r["unknown_words"] for r in records] == [["abnormalivigesiseen"], [], [], ["segmentedd"]]
    counts = summarise(records)["unknown_word_answers"]
    assert counts["n"] == 4 and counts["with_unknown"] == 2 and counts["share"] == 0.5
    assert counts["per_kind"] == {"diagnosis": {"n": 2, "with_unknown": 1}, "segmentation": {"n": 2, "with_unknown": 1}}
    report = markdown(summarise(records))
    assert "| diagnosis | 2 | 1 |" in report and "| all | 4 | 2 |" in report and "abnormalivigesiseen" in report


def test_step_time_estimate_ignores_a_few_slow_steps():
    steady, slow = 0.5, 3.0
    times = np.cumsum([4.0] + [slow if n in (3, 4) else steady for n in range(1, 10)])  # first step: one-off costs
    records = [{"step": n + 1, "time": float(t)} for n, t in enumerate(times)]
    assert _seconds_per_step(records) == pytest.approx(steady)


def test_an_empty_output_folder_name_is_refused_not_taken_as_the_current_folder(capsys):
    """`out_dir` given as "$UNSET" became the current folder: the demo data, runs and checkpoint went wherever the
    command was started. An empty out_dir or --previous-run is refused, naming it."""
    from medsight.demo.train_demo import parser

    for argv, named in (([""], "out_dir"), (["out", "--previous-run", ""], "--previous-run")):
        with pytest.raises(SystemExit) as stopped:
            parser().parse_args(argv)
        assert stopped.value.code == 2
        assert f"argument {named}: an empty name" in capsys.readouterr().err
