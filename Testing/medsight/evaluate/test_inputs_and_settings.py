"""`medsight eval` inputs and report folders: a report records the model and options its predictions were made with
and refuses a rerun with others; unreadable images, a file as report folder and a limit below 1 are named errors;
JSON Lines data files are read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.evaluate.cli import main
from medsight.evaluate.provenance import SETTINGS_FILE, source_identity
from medsight.evaluate.readers import DataError, read_llava_vqa
from medsight.evaluate.runner import ITEM_SEED_STRIDE, LARGEST_RUN_SEED, read_predictions, select_items

ARGS = ["--bootstrap", "5", "--quiet", "--dtype", "float32", "--max-new-tokens", "5"]


def _item(qid: str, image: str, question: str, answer: str, kind: str) -> dict:
    return {"id": qid, "image": image, "answer_type": kind,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def vqa(tmp_path) -> Path:
    """Two questions on one small image, as a LLaVA VQA file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    items = [_item("q0", "img.png", "Is this an MRI?", "yes", "CLOSED"),
             _item("q1", "img.png", "What organ is shown?", "brain", "OPEN")]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(items))
    return path


def _eval(vqa: Path, report: Path, *extra: str) -> int:
    return main(["vqa", "--data", str(vqa), "--report", str(report), *ARGS, *extra])


def test_rerun_with_another_model_or_options_is_refused_and_the_report_names_them(vqa, tmp_path):
    report = tmp_path / "report"
    assert _eval(vqa, report, "--model", "demo") == 0
    predictions = (report / "predictions.jsonl").read_text()
    for extra, named in [
        (["--model", "tiny"],
         r"model: 'demo' \(embedded demo model\) there, 'tiny' \(tiny preset, random weights\) now"),
        (["--model", "demo", "--sampling", "greedy"], r"sampling: \"official\" there, \"greedy\" now"),
        (["--model", "demo", "--max-new-tokens", "7"], r"max_new_tokens: 5 there, 7 now"),
        (["--model", "demo", "--seed", "3"], r"seed: 0 there, 3 now"),
    ]:
        with pytest.raises(DataError, match=rf"{report} holds predictions made with other settings \({named}\)\. "
                                            r"Rerun with the settings in .*settings\.json to resume, or choose "
                                            r"another --report folder"):
            _eval(vqa, report, *extra)
    assert (report / "predictions.jsonl").read_text() == predictions
    # The same settings resume (nothing to answer) and the report says what produced it.
    assert _eval(vqa, report, "--model", "demo", "--bootstrap", "7") == 0
    written = json.loads((report / "report.json").read_text())
    assert written["settings"]["model"] == "demo" and written["settings"]["model_weights"] == "embedded demo model"
    assert written["settings"]["sampling"] == "official" and written["settings"]["max_new_tokens"] == 5
    text = (report / "report.md").read_text()
    assert "Model: demo (embedded demo model)." in text and "max_new_tokens 5" in text


def test_settings_of_a_run_that_stopped_before_its_first_answer_are_not_called_predictions(vqa, tmp_path):
    """A run that failed after recording its settings and before its first answer left a folder that refused every
    other setting as holding "predictions made with other settings", which it did not hold: the refusal now says no
    prediction is there and how to free the folder; freed so, it answers."""
    import shutil

    done, stopped = tmp_path / "done", tmp_path / "stopped"
    assert _eval(vqa, done, "--model", "demo") == 0
    stopped.mkdir()
    shutil.copy(done / SETTINGS_FILE, stopped / SETTINGS_FILE)  # what a run stopped before its first answer leaves
    recorded = json.loads((stopped / SETTINGS_FILE).read_text())["max_new_tokens"]
    with pytest.raises(DataError, match=rf"settings\.json records other settings \(max_new_tokens: {recorded} there, "
                                        rf"{recorded + 1} now\), though {stopped} holds no predictions yet: .* delete "
                                        r".*settings\.json and rerun"):
        _eval(vqa, stopped, "--model", "demo", "--max-new-tokens", str(recorded + 1))
    (stopped / SETTINGS_FILE).unlink()
    assert _eval(vqa, stopped, "--model", "demo", "--max-new-tokens", str(recorded + 1)) == 0
    assert len(read_predictions(stopped / "predictions.jsonl")) == len(json.loads(vqa.read_text()))


def test_a_run_refused_before_its_first_answer_leaves_the_report_folder_as_it_found_it(vqa, tmp_path, monkeypatch):
    """A mistyped --model left settings.json (and the folders it made) behind: the corrected rerun was refused until
    the user deleted it. A refused run now leaves the folder as it was; one that answered keeps everything."""
    from medsight.evaluate.cli import _LazyEngine
    from medsight.model.checkpoints import CheckpointError

    new = tmp_path / "new" / "deeper" / "report"
    with pytest.raises(CheckpointError, match="demoo"):
        _eval(vqa, new, "--model", "demoo")
    assert not (tmp_path / "new").exists()
    # 'a/b/../c/report' makes a, a/b, a/c and a/c/report: all four go (a and a/b were left); 'a/b/../kept' is
    # a/kept, an empty folder that was there: it stays (it was taken for one the run made).
    before = set(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="demoo"):
        _eval(vqa, tmp_path / "a" / "b" / ".." / "c" / "report", "--model", "demoo")
    assert set(tmp_path.rglob("*")) == before
    (tmp_path / "a" / "kept").mkdir(parents=True)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="demoo"):
        _eval(vqa, tmp_path / "a" / "new" / ".." / "kept" / "report", "--model", "demoo")
    assert set(tmp_path.rglob("*")) == before and (tmp_path / "a" / "kept").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="demoo"):
        _eval(vqa, empty, "--model", "demoo")
    assert list(empty.iterdir()) == []
    # A run stopped after its first answer keeps it and its settings: the same command resumes.
    asked = []
    real_ask = _LazyEngine.ask

    def stopped_after_one(self, *a, **k):
        if asked:
            raise KeyboardInterrupt
        asked.append(1)
        return real_ask(self, *a, **k)

    monkeypatch.setattr(_LazyEngine, "ask", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        _eval(vqa, new, "--model", "demo")
    assert (new / SETTINGS_FILE).is_file() and len(read_predictions(new / "predictions.jsonl")) == len(asked)
    monkeypatch.setattr(_LazyEngine, "ask", real_ask)
    assert _eval(vqa, new, "--model", "demo") == 0
    assert len(read_predictions(new / "predictions.jsonl")) == len(json.loads(vqa.read_text()))


def test_json_prints_the_reports_counts_or_one_error_object(vqa, tmp_path, capsys):
    report = tmp_path / "report"
    assert _eval(vqa, report, "--model", "demo", "--json") == 0
    said = json.loads(capsys.readouterr().out)
    written = json.loads((report / "report.json").read_text())
    assert said == {"report": str(report / "report.json"), **{k: written[k] for k in ("n_items", "n_scored",
                    "n_missing")}, "shard": 0, "num_shards": 1}
    assert said["n_items"] == len(json.loads(vqa.read_text()))
    assert _eval(vqa, tmp_path / "shard", "--model", "demo", "--json", "--shard", "1", "--num-shards", "2") == 0
    assert json.loads(capsys.readouterr().out) == {"report": None, "n_items": None, "n_scored": None,
                                                   "n_missing": None, "shard": 1, "num_shards": 2}


def test_a_model_folder_is_known_by_its_files_not_its_path(tmp_path):
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    first = source_identity(str(folder))
    assert source_identity(os.path.relpath(folder)) == first
    moved = folder.rename(tmp_path / "moved")
    assert source_identity(str(moved)) == first
    (moved / "model.safetensors").write_bytes(b"retrained")  # same folder, new weights
    assert source_identity(str(moved)) != first


def test_unreadable_images_are_named_before_any_item_is_answered(vqa, tmp_path):
    """A truncated image was found when its item came to be asked: the run stopped there, late on a large data set
    (item q0 was answered first)."""
    (tmp_path / "trunc.png").write_bytes((tmp_path / "img.png").read_bytes()[:60])
    # Image.verify checks nothing of a JPEG: a truncated one stopped the run when its item came.
    Image.open(tmp_path / "img.png").save(tmp_path / "whole.jpg", quality=95)
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:-200])
    (tmp_path / "adir").mkdir()
    for image, problem in [("trunc.png", r"cannot read the image .*trunc\.png: "),
                           ("trunc.jpg", r"cannot read the image .*trunc\.jpg: image file is truncated"),
                           ("adir", r".*adir is a folder; expected the image")]:
        bad = tmp_path / f"bad_{image}.json"
        bad.write_text(json.dumps([_item("q0", "img.png", "Is this an MRI?", "yes", "CLOSED"),
                                   _item("q1", image, "What organ?", "brain", "OPEN")]))
        with pytest.raises(DataError, match=rf"item 'q1': {problem}"):
            main(["vqa", "--data", str(bad), "--report", str(tmp_path / f"rep_{image}"), "--model", "demo", *ARGS])
        assert read_predictions(tmp_path / f"rep_{image}" / "predictions.jsonl") == []


def test_a_missing_image_says_where_relative_paths_are_looked_for(vqa, tmp_path):
    """OmniMedVQA's image paths are relative to the data set's root, two folders above its Modality_*.json files:
    the error named the path it tried but not that --images sets the folder relative paths are joined to."""
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (tmp_path / "Images").mkdir()
    (tmp_path / "img.png").rename(tmp_path / "Images" / "img.png")
    (qa / "Modality_CT.json").write_text(json.dumps([{"question_id": "ct0", "question": "Which organ?",
                                                      "gt_answer": "Liver", "option_A": "Liver", "option_B": "Lung",
                                                      "image_path": "Images/img.png"}]))
    with pytest.raises(DataError, match=rf"item 'ct0': image not found: {qa / 'Images' / 'img.png'} \(relative image "
                                        r"and mask paths of the data file are joined to --images, by default the data "
                                        r"file's folder: pass --images with the folder they are relative to; "
                                        r"absolute ones are used as written\)"):
        main(["mc", "--data", str(qa), "--report", str(tmp_path / "rep"), "--model", "demo", *ARGS])
    assert main(["mc", "--data", str(qa), "--images", str(tmp_path), "--report", str(tmp_path / "rep"), "--model",
                 "demo", *ARGS]) == 0
    assert len(read_predictions(tmp_path / "rep" / "predictions.jsonl")) == 1


def test_images_is_never_ignored_for_absolute_paths_and_must_be_a_folder(vqa, tmp_path):
    """A data file naming its images by absolute paths (written on another machine) kept them and ignored --images
    silently: the run then failed on its first image, advising to pass the --images already given. Absolute paths
    inside --images are read; outside it, and an --images that is no folder, are refused before anything is asked."""
    items = json.loads(vqa.read_text())
    elsewhere = _write_items(tmp_path / "abs.json", items, "/home/author/VQA-RAD/img.png")
    inside = _write_items(tmp_path / "inside.json", items, str(tmp_path / "img.png"))
    with pytest.raises(DataError, match=rf"abs\.json: item 0 \(id 'q0'\): /home/author/VQA-RAD/img\.png does "
                                        rf"not exist: an absolute path is used as written, and --images {tmp_path} "
                                        r"applies to relative paths only"):
        _eval(elsewhere, tmp_path / "refused", "--images", str(tmp_path))
    for images, problem in ((tmp_path / "none", "no such folder"), (vqa, "not a folder")):
        with pytest.raises(ValueError, match=rf"--images {images}: {problem}; give the folder"):
            _eval(vqa, tmp_path / "refused", "--images", str(images))
    assert not (tmp_path / "refused").exists()
    assert _eval(inside, tmp_path / "report", "--images", str(tmp_path)) == 0
    assert len(read_predictions(tmp_path / "report" / "predictions.jsonl")) == len(items)


def _write_items(path: Path, items: list[dict], image: str) -> Path:
    path.write_text(json.dumps([{**item, "image": image} for item in items]))
    return path


def test_a_file_as_report_folder_is_refused(vqa):
    with pytest.raises(ValueError, match=rf"--report {vqa} is a file; the report goes into a folder"):
        _eval(vqa, vqa, "--model", "demo")
    assert read_llava_vqa(vqa)  # untouched


def test_a_symbolic_link_to_nothing_or_a_file_on_the_report_path_is_named_not_followed(vqa, tmp_path):
    """A --report that is (or lies under) a link to nothing stopped with a bare "File exists"; a file on its path with
    "settings.json: Not a directory". Each is now one line naming the path and the problem; the link's target is not
    created (it may be an unmounted disk's folder), and nothing is written."""
    target = tmp_path / "unmounted" / "results"
    (tmp_path / "link").symlink_to(target)
    before = sorted(tmp_path.rglob("*"))
    for report, named in ((tmp_path / "link", "--report"), (tmp_path / "link" / "run1", "its folder")):
        with pytest.raises(ValueError) as raised:
            _eval(vqa, report, "--model", "demo")
        message = str(raised.value)
        assert message.startswith("--report") and named in message and "\n" not in message
        assert f"{tmp_path / 'link'} is a symbolic link to {target}, which is not there" in message
    under_file = vqa / "report"
    with pytest.raises(ValueError, match=rf"--report {under_file}: its folder {vqa} is a file; the report goes into"):
        _eval(vqa, under_file, "--model", "demo")
    assert sorted(tmp_path.rglob("*")) == before and not target.parent.exists()
    target.mkdir(parents=True)  # a link to a folder is followed
    assert _eval(vqa, tmp_path / "link", "--model", "demo") == 0
    assert len(read_predictions(target / "predictions.jsonl")) == len(json.loads(vqa.read_text()))


def test_a_limited_run_says_how_many_items_of_the_data_it_left_out(vqa, tmp_path, capsys):
    """--limit 1 of a 2-item file: the report counted 1 item, scored 1, missing 0, and named neither the limit nor
    the item left out (nor did its settings); every item of the data is now scored or counted as left out."""
    n_data = len(read_llava_vqa(vqa))
    assert main(["vqa", "--data", str(vqa), "--report", str(tmp_path / "r"), *[a for a in ARGS if a != "--quiet"],
                 "--model", "demo", "--limit", "1"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    note = f"--limit 1: only the first 1 of the data's {n_data} items were asked and scored"
    assert report["n_items"] == report["n_scored"] == 1 and note in report["notes"]
    assert note in (tmp_path / "r" / "report.md").read_text()
    console = capsys.readouterr().err
    assert f"items: 1 (--limit: {n_data - 1} more in the data), scored: 1, missing: 0. Answer types: closed 1 of 1 " \
           "scored (closed_accuracy)." in console
    # The report's settings name the limit (they did not: a partial report's settings read as a full run's) ...
    assert report["settings"]["limit"] == 1
    assert "dtype float32, --limit 1." in (tmp_path / "r" / "report.md").read_text()
    # ... and the full run resumed into the same folder says it has none.
    assert _eval(vqa, tmp_path / "r", "--model", "demo") == 0
    full = json.loads((tmp_path / "r" / "report.json").read_text())
    assert full["settings"]["limit"] is None and full["n_items"] == full["n_scored"] == n_data
    assert "--limit" not in (tmp_path / "r" / "report.md").read_text()


def test_a_folder_holding_files_no_evaluation_wrote_keeps_them(vqa, tmp_path):
    """--report pointed at a folder of the user's (their own report.md, a chart) replaced those files with this run's
    report, unsaid. Refused before anything is asked; the folder of an earlier run is still resumed and rewritten."""
    mine = {"report.md": "my notes", "accuracy.png": "my chart"}
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in mine.items():
        (folder / name).write_text(text)
    with pytest.raises(ValueError, match=rf"--report {folder} holds report\.md, accuracy\.png, which no evaluation "
                                         r"recorded there \(no settings\.json\); the report would replace them"):
        _eval(vqa, folder, "--model", "demo")
    assert {p.name: p.read_text() for p in folder.iterdir()} == mine
    assert _eval(vqa, tmp_path / "ours", "--model", "demo") == 0
    assert _eval(vqa, tmp_path / "ours", "--model", "demo") == 0  # its own report is rewritten on a rerun


@pytest.mark.parametrize("option", ["--report", "--adapter", "--vision-file", "--images", "--data", "--vqa-data"])
def test_an_empty_file_name_is_refused_not_taken_as_not_given(vqa, tmp_path, monkeypatch, capsys, option):
    """`--report "$UNSET"` wrote the report into the current folder; `--adapter ""` answered without the adapter
    while settings.json and the report named one (the current folder's files hashed as it)."""
    monkeypatch.chdir(tmp_path)
    named = {"--data": str(vqa), "--report": str(tmp_path / "report"), option: ""}
    args = ["vqa", *(x for pair in named.items() for x in pair), *ARGS]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"medsight eval: error: argument {option}: an empty name: "
                                                        "give a file or folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["img.png", vqa.name])  # nothing written


def test_a_vision_file_the_model_ignores_is_refused_not_named_in_the_report(vqa, tmp_path):
    """--vision-file with the embedded demo model was ignored by the loader, yet settings.json and the report named it
    as the vision file the answers came from."""
    vision = tmp_path / "unimed_clip.pt"
    vision.write_bytes(b"not used")
    with pytest.raises(ValueError, match=rf"--vision-file {vision}: --model demo does not use a vision file"):
        _eval(vqa, tmp_path / "report", "--model", "demo", "--vision-file", str(vision))
    assert not (tmp_path / "report").exists()


def test_a_finished_report_folder_of_an_older_medsight_is_pointed_to_adopt_settings(vqa, tmp_path):
    """An older medsight's finished folder (predictions and its report, no settings.json) was refused as a folder
    of the user's files ("choose a new or empty folder, or the folder of an earlier run"): it is the folder of an
    earlier run, and the way to resume it, --adopt-settings, went unsaid. Its predictions now get the adopt advice."""
    report = tmp_path / "report"
    assert _eval(vqa, report, "--model", "demo") == 0
    (report / "settings.json").unlink()  # what an older medsight left: predictions, report.md, report.json, charts
    left = {p.name: p.read_bytes() for p in report.iterdir()}
    with pytest.raises(DataError, match=rf"{report} holds predictions but no settings\.json .*rerun it with "
                                        r"--adopt-settings to record these settings and resume"):
        _eval(vqa, report, "--model", "demo")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == left
    assert _eval(vqa, report, "--model", "demo", "--adopt-settings") == 0


def test_a_negative_seed_is_refused_before_anything_is_answered(vqa, tmp_path):
    """--seed -1 answered every item, then the report's bootstrap refused the seed ("expected non-negative integer"):
    no report, and a rerun with another seed is refused by the folder's recorded settings."""
    with pytest.raises(ValueError, match=r"--seed -1: must be at least 0"):
        _eval(vqa, tmp_path / "report", "--model", "demo", "--seed", "-1")
    assert not (tmp_path / "report").exists()


def test_a_seed_too_large_for_the_items_sampling_seeds_is_refused_before_anything_is_answered(vqa, tmp_path):
    """--seed 2**63 was recorded in settings.json, then torch refused the first item's sampling seed (the seed times
    ITEM_SEED_STRIDE plus its position) as "Overflow when unpacking long long", naming no option; the folder then
    refused any other seed as holding "predictions made with other settings". Now refused before anything."""
    from medsight.server.schemas import SEED_MAX

    assert LARGEST_RUN_SEED * ITEM_SEED_STRIDE + ITEM_SEED_STRIDE - 1 <= SEED_MAX  # every item's seed fits torch's
    for seed in (LARGEST_RUN_SEED + 1, SEED_MAX // ITEM_SEED_STRIDE + 1):
        with pytest.raises(ValueError, match=rf"--seed {seed}: must be at most {LARGEST_RUN_SEED} "):
            _eval(vqa, tmp_path / "report", "--model", "demo", "--seed", str(seed))
        assert not (tmp_path / "report").exists()
    assert _eval(vqa, tmp_path / "report", "--model", "demo", "--seed", str(LARGEST_RUN_SEED)) == 0
    seeds = [p["metadata"]["seed"] for p in read_predictions(tmp_path / "report" / "predictions.jsonl")]
    assert len(seeds) == len(read_llava_vqa(vqa))
    assert all(LARGEST_RUN_SEED * ITEM_SEED_STRIDE <= seed <= SEED_MAX for seed in seeds)  # sampled, with its seed


@pytest.mark.parametrize("limit", [-1, 0])
def test_a_limit_below_one_is_refused(vqa, tmp_path, limit):
    with pytest.raises(ValueError, match=rf"--limit {limit}: must be at least 1"):
        _eval(vqa, tmp_path / "report", "--model", "demo", "--limit", str(limit))
    assert not (tmp_path / "report" / "report.json").exists()
    with pytest.raises(ValueError, match=rf"--limit {limit}: must be at least 1"):
        select_items(list("abc"), limit=limit)


def test_json_lines_data_is_read_and_a_json_file_of_lines_says_so(vqa, tmp_path):
    items = json.loads(vqa.read_text())
    lines = "".join(json.dumps(it) + "\n" for it in items)
    (tmp_path / "vqa.jsonl").write_text(lines + "\n")
    assert read_llava_vqa(tmp_path / "vqa.jsonl") == read_llava_vqa(vqa)
    assert _eval(tmp_path / "vqa.jsonl", tmp_path / "rep", "--model", "demo") == 0
    assert [r["question_id"] for r in read_predictions(tmp_path / "rep" / "predictions.jsonl")] == ["q0", "q1"]
    (tmp_path / "lines.json").write_text(lines)
    with pytest.raises(DataError, match=r"lines\.json: not valid JSON \(Extra data.*\); the file must be one JSON "
                                        r"list of items \(JSON Lines, one item per line, are read from files named "
                                        r"\*\.jsonl\)"):
        read_llava_vqa(tmp_path / "lines.json")


def test_a_folder_an_older_medsight_answered_is_resumed_only_when_adopted(vqa, tmp_path):
    report = tmp_path / "report"
    assert _eval(vqa, report, "--model", "demo") == 0
    recorded = (report / "settings.json").read_text()
    answers = read_predictions(report / "predictions.jsonl")
    # What the older medsight left: each shard's predictions, no settings.json, no merge or report yet.
    for f in report.iterdir():
        f.unlink()
    for shard, rec in enumerate(answers):
        (report / f"predictions.shard{shard}-of-2.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=rf"{report} holds predictions but no settings\.json \(an older medsight made "
                                        r"them\), so which model and options produced them is unknown\. If this "
                                        r"command's model and options made them, rerun it with --adopt-settings to "
                                        r"record these settings and resume; otherwise choose another --report "
                                        r"folder"):
        _eval(vqa, report, "--model", "demo")
    assert not (report / "settings.json").exists()
    # Adopted: the shards merge into the report (nothing answered again) under the recorded settings.
    assert _eval(vqa, report, "--model", "demo", "--adopt-settings") == 0
    assert (report / "settings.json").read_text() == recorded
    assert read_predictions(report / "predictions.jsonl") == answers
    assert json.loads((report / "report.json").read_text())["settings"]["model_weights"] == "embedded demo model"
    # The flag never replaces recorded settings.
    with pytest.raises(DataError, match=r"holds predictions made with other settings \(model: 'demo' .*\)\..* for "
                                        r"these ones \(--adopt-settings only records settings where none are\)"):
        _eval(vqa, report, "--model", "tiny", "--adopt-settings")
    assert (report / "settings.json").read_text() == recorded


def _noise(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def test_answers_to_other_data_are_refused_naming_the_items(vqa, tmp_path):
    report = tmp_path / "report"
    assert _eval(vqa, report, "--model", "demo") == 0
    predictions = (report / "predictions.jsonl").read_text()
    items = json.loads(vqa.read_text())
    other = tmp_path / "other"
    other.mkdir()
    _noise(other / "img.png", 1)
    (other / "img2.png").write_bytes((tmp_path / "img.png").read_bytes())
    edited_question = [_item("q0", "img.png", "Is there a fracture?", "no", "CLOSED"), items[1]]
    new_image = [items[0], _item("q1", "img2.png", "What organ is shown?", "brain", "OPEN")]
    for data, images, named in [
        (edited_question, None, r"'q0' \(question\)"),  # another --data file, or the same one edited
        (new_image, str(other), r"'q0' \(image or mask file\)"),  # another --images folder: q0's img.png differs
        ([items[1], items[0]], None, r"'q0' \(position in the data file, which seeds its sampling\), 'q1'"),
    ]:
        changed = tmp_path / "changed.json"
        changed.write_text(json.dumps(data))
        extra = ["--images", images] if images else []
        with pytest.raises(DataError, match=rf"{report / 'predictions.jsonl'} holds answers to \d item\(s\) that "
                                            rf"this command's data asks otherwise: {named}.*\. They were asked about "
                                            r"another --data file, an edited one or another --images folder; choose "
                                            r"another --report folder for this data"):
            _eval(changed, report, "--model", "demo", *extra)
        assert (report / "predictions.jsonl").read_text() == predictions
    # The same data moved elsewhere still matches; a corrected GT answer is rescored from the kept answers.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "img.png").write_bytes((tmp_path / "img.png").read_bytes())
    text = read_predictions(report / "predictions.jsonl")[1]["text"]
    (moved / "vqa.json").write_text(json.dumps([items[0], _item("q1", "img.png", "What organ is shown?", text,
                                                                "OPEN")]))
    assert _eval(moved / "vqa.json", report, "--model", "demo") == 0
    assert (report / "predictions.jsonl").read_text() == predictions
    rows = {(r["metric"], r["aggregate"]): r for r in json.loads((report / "report.json").read_text())["metrics"]}
    assert rows[("strict_exact", "per_sample_mean")]["value"] == 100.0
    assert "Data: " + str(moved / "vqa.json") in (report / "report.md").read_text()
    # A report rebuilt where the images are not (nothing to answer): the questions are still compared.
    (moved / "img.png").unlink()
    assert _eval(moved / "vqa.json", report, "--model", "demo") == 0
    assert (report / "predictions.jsonl").read_text() == predictions


def test_the_dtype_is_recorded_as_loaded_and_an_older_auto_is_adopted_only_on_request(vqa, tmp_path):
    report = tmp_path / "report"
    assert main(["vqa", "--data", str(vqa), "--report", str(report), "--model", "demo", "--device", "cpu",
                 "--bootstrap", "5", "--quiet", "--max-new-tokens", "5"]) == 0
    settings = json.loads((report / "settings.json").read_text())
    assert settings["dtype"] == "float32"  # what "auto" is on the CPU; bfloat16 on a GPU would be refused
    with pytest.raises(DataError, match=r"other settings \(dtype: \"float32\" there, \"bfloat16\" now\)"):
        _eval(vqa, report, "--model", "demo", "--dtype", "bfloat16")
    # An older medsight recorded "auto", which names neither.
    (report / "settings.json").write_text(json.dumps({**settings, "dtype": "auto"}))
    with pytest.raises(DataError, match=r"settings\.json does not say which dtype made its predictions \(an older "
                                        r"medsight wrote it\)\. If this command's \(dtype \"float32\"\) did, rerun it "
                                        r"with --adopt-settings to record that and resume"):
        _eval(vqa, report, "--model", "demo")
    assert _eval(vqa, report, "--model", "demo", "--adopt-settings") == 0
    assert json.loads((report / "settings.json").read_text()) == settings


def _diagseg_without_masks(folder: Path, **extra) -> Path:
    """The vqa fixture's questions as a DiagSeg text-only file (the `_vqa.json` kind: no masks)."""
    items = [{"qa_id": it["id"], "question": it["conversations"][0]["value"],
              "short_answer": it["conversations"][1]["value"], "image_file": it["image"], "modality": "MRI", **extra}
             for it in json.loads((folder / "vqa.json").read_text())]
    path = folder / "diagseg_vqa.json"
    path.write_text(json.dumps(items))
    return path


def test_bad_diagseg_data_is_refused_naming_the_item_before_the_model_is_asked(vqa, tmp_path, monkeypatch):
    """A text-only DiagSeg file as --data had its first item asked, then stopped with "item has no GT mask"; an
    empty data file gave an empty report and exit status 0. (A DiagSeg "mc" item needs no options: run_eval.py skips
    it, and so does the report.)"""
    from medsight.engine import Engine

    def no_model(*a, **k):
        raise AssertionError("the data is refused before any item is asked")

    monkeypatch.setattr(Engine, "load", no_model)
    text_only = _diagseg_without_masks(tmp_path)
    with pytest.raises(DataError, match=r"item 'q0' has no GT mask \('mask_ids' and 'masks'\) to score its Dice "
                                        r"against: --data takes the DiagSeg file with masks .* the text-only "
                                        r"_vqa\.json goes to --vqa-data"):
        main(["diagseg", "--data", str(text_only), "--report", str(tmp_path / "t"), "--model", "demo", *ARGS])
    assert not list((tmp_path / "t").glob("predictions*")) and not (tmp_path / "t" / "report.json").exists()
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: holds no items"):
        main(["diagseg", "--data", str(empty), "--report", str(tmp_path / "e"), "--model", "demo", *ARGS])
    assert not (tmp_path / "e").exists()


def _diagseg_with_masks(folder: Path, bad_mask) -> tuple[Path, str]:
    """Three DiagSeg items on the vqa fixture's image, each with a GT mask of its size; the last one's masks are
    replaced by `bad_mask(folder, good_mask)` (a list of mask files). Returns the data file and that item's id."""
    height, width = np.asarray(Image.open(folder / "img.png")).shape[:2]
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    items = [{"qa_id": f"s{i}", "question": "Where is the lesion?", "short_answer": "liver", "image_file": "img.png",
              "modality": "CT", "mask_ids": [0], "masks": [[0, "mask.png"]]} for i in range(3)]
    items[-1]["masks"] = [[0, bad_mask(folder, folder / "mask.png")]]
    path = folder / "diagseg.json"
    path.write_text(json.dumps(items))
    return path, items[-1]["qa_id"]


def _garbage(folder: Path, good: Path) -> list[str]:
    (folder / "garbage.png").write_bytes(b"no image here " * 8)
    return ["garbage.png"]


def _truncated(folder: Path, good: Path) -> list[str]:
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return ["truncated.png"]


def _other_size(folder: Path, good: Path) -> list[str]:
    height, width = np.asarray(Image.open(good)).shape
    Image.fromarray(np.zeros((height + 1, width), np.uint8)).save(folder / "taller.png")
    return ["mask.png", "taller.png"]


@pytest.mark.parametrize("bad_mask, problem", [
    (_garbage, r"cannot read the mask \S+garbage\.png: cannot identify image file"),
    (_truncated, r"cannot read the mask \S+truncated\.png: Truncated File Read"),
    (_other_size, r"mask \S+taller\.png is \((\d+), (\d+)\), the other masks of its item are \((\d+), \2\)"),
])
def test_a_bad_gt_mask_is_named_before_any_item_is_answered(vqa, tmp_path, monkeypatch, bad_mask, problem):
    """GT masks were read only after their item was answered: a garbage, truncated or mismatched mask on the last
    item stopped the run after the model had answered every item before it, and that item too (its answer lost)."""
    from medsight.engine import Engine

    def no_model(*a, **k):
        raise AssertionError("the bad mask is named before any item is asked")

    data, bad_item = _diagseg_with_masks(vqa.parent, bad_mask)
    monkeypatch.setattr(Engine, "load", no_model)
    with pytest.raises(DataError, match=rf"^item {bad_item!r}: {problem}"):
        main(["diagseg", "--data", str(data), "--report", str(tmp_path / "rep"), "--model", "demo", *ARGS])
    assert read_predictions(tmp_path / "rep" / "predictions.jsonl") == []


def test_the_check_before_the_run_shows_its_progress(vqa, capsys):
    """The check decodes every JPEG at 1/8 scale (minutes for OmniMedVQA's 88k items) before the first answer: it
    showed nothing meanwhile, like a hang."""
    from medsight.evaluate.runner import RunOptions, check_files

    items = read_llava_vqa(vqa)
    check_files(list(enumerate(items)), RunOptions("vqa"), progress="predictions")
    err = capsys.readouterr().err
    assert f"predictions: checking files:   0%|          | 0/{len(items)}" in err
    check_files(list(enumerate(items)), RunOptions("vqa"))
    assert capsys.readouterr().err == ""  # --quiet: no bar


@pytest.mark.parametrize("option, value, task", [("--benchmark", "slake", "vqa"), ("--vqa-data", None, "diagseg")])
def test_an_option_of_another_task_is_refused_not_ignored(vqa, tmp_path, option, value, task):
    """A DiagSeg or OmniMedVQA report took --benchmark's name into its title ("diagseg (slake)") and a vqa run ignored
    --vqa-data, so the report seemed to have used it."""
    value = value or str(vqa)
    others = [t for t in ("diagseg", "vqa", "mc") if t != task]
    for other in others:
        with pytest.raises(ValueError, match=rf"{option} {value}: only `medsight eval {task}` takes it, not {other}"):
            main([other, "--data", str(vqa), "--report", str(tmp_path / other), *ARGS, option, value])
        assert not (tmp_path / other).exists()
