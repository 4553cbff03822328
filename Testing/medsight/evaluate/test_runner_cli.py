"""Resumable predictions, a two-process sharded run, and `medsight eval diagseg` end to end on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.demo import build_demo_data
from medsight.evaluate.cli import main
from medsight.evaluate.demo_diagseg import demo_to_diagseg
from medsight.evaluate.metrics import dice_from_logits, precision_recall_f1
from medsight.evaluate.readers import DataError, read_diagseg
from medsight.evaluate.runner import (
    RunOptions,
    decode_masks,
    encode_masks,
    merge_shards,
    read_predictions,
    run_predictions,
    select_items,
    shard_from_env,
)
from medsight_testing.disk import file_size_limit
from medsight_testing.torchrun import interrupt_torchrun, torchrun

ARGS = ["--model", "demo", "--max-new-tokens", "40", "--bootstrap", "50", "--quiet", "--dtype", "float32"]


@pytest.fixture(scope="module")
def diagseg(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_data(root, size="tiny")
    return demo_to_diagseg(root, "test")


@pytest.fixture(scope="module")
def single_run(diagseg, tmp_path_factory):
    """The single-process end-to-end run every other test compares with."""
    out = tmp_path_factory.mktemp("single")
    assert main(["diagseg", "--data", str(diagseg[0]), "--report", str(out), *ARGS]) == 0
    return out


class SimulatedCrashError(Exception):
    pass


class FlakyEngine:
    """Delegates to an engine and dies after `fail_after` asks, like a killed job."""

    def __init__(self, engine, fail_after):
        self.engine, self.left = engine, fail_after

    def ask(self, *a, **k):
        if self.left == 0:
            raise SimulatedCrashError
        self.left -= 1
        return self.engine.ask(*a, **k)


def test_stored_masks_roundtrip_and_corrupt_ones_are_named():
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[1, 1:3] = m[2, 3] = True
    stored = encode_masks([m, ~m], m.shape)
    assert stored["rle"][0][:2] == [0, 1]
    assert np.array_equal(decode_masks(stored, m.shape), np.stack([m, ~m]))
    assert decode_masks(encode_masks([], m.shape), m.shape).shape == (0, 3, 4)
    with pytest.raises(DataError, match="RLE counts sum to 11, expected 12"):
        decode_masks({"shape": [3, 4], "rle": [[0, 11]]}, m.shape)


def test_a_shard_needs_both_its_number_and_the_count():
    for shard, count, named in [(None, 2, "--num-shards needs --shard too"), (1, None, "--shard needs --num-shards")]:
        with pytest.raises(ValueError, match=rf"{named}.*: each process takes --shard i \(0 <= i < n\) of "):
            shard_from_env(shard, count)
    assert shard_from_env(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="shard 2 of 2: need 0 <= shard < num_shards"):
        shard_from_env(2, 2)


def test_a_predictions_line_that_is_no_prediction_is_named(tmp_path):
    path = tmp_path / "predictions.jsonl"
    for n, bad in [(2, '{"text": "yes"}'), (2, "[1, 2]"), (2, '{"question_id": "q1"}')]:
        path.write_text('{"question_id": "q0", "text": "no"}\n' + bad + "\n")
        with pytest.raises(DataError, match=rf"predictions\.jsonl: line {n} is not a prediction \(a JSON object with "
                                            r"'question_id' and 'text'\)"):
            read_predictions(path)
    path.write_text('{"question_id": "q0", "text": "no"}\n{"question_id": 1, "text": ""}\n')
    assert [r["question_id"] for r in read_predictions(path)] == ["q0", 1]


def test_select_items_shards_after_limit():
    items = list("abcdefg")
    assert [x for _, x in select_items(items, 1, 2, limit=5)] == ["b", "d"]
    assert sorted(i for s in range(3) for i, _ in select_items(items, s, 3)) == list(range(7))


def test_resume_after_interruption(diagseg, single_run, tmp_path):
    from medsight import Engine

    items = read_diagseg(diagseg[0])
    engine = Engine.load("demo", device="cpu")  # the embedded demo model, as ARGS
    options = RunOptions("diagseg", max_new_tokens=40)
    path = tmp_path / "p.jsonl"
    with pytest.raises(SimulatedCrashError):
        run_predictions(FlakyEngine(engine, 3), items, path, options)
    assert len(read_predictions(path)) == 3
    with open(path, "a") as f:
        f.write('{"question_id": "half-writ')  # a write cut by the crash
    resumed = run_predictions(FlakyEngine(engine, len(items) - 3), items, path, options)
    assert [r["question_id"] for r in resumed] == [it.id for it in items]
    assert resumed == read_predictions(single_run / "predictions.jsonl")
    # The stored masks are the official binarisation of the engine's logits.
    answer = engine.ask([np.asarray(Image.open(items[0].image).convert("RGB"))], items[0].question,
                        options.generation(), __import__("medsight").ImageOptions(resize_mode="crop"))
    gt = np.asarray(Image.open(items[0].masks[0]).convert("L")) > 127
    import torch

    expected = dice_from_logits(torch.stack([r.mask_logits for r in answer[0].regions]), gt)
    masks = resumed[0]["masks"]
    stored = decode_masks(masks, masks["shape"])
    from medsight.evaluate.metrics import item_dice

    assert item_dice(stored, gt) == pytest.approx(expected)


def test_two_process_sharded_run_equals_single(diagseg, single_run, tmp_path):
    code = "import sys; from medsight.evaluate.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, "diagseg", "--data", str(diagseg[0]), "--report",
                               str(tmp_path), "--shard", str(i), "--num-shards", "2", *ARGS], env=env)
             for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    shards = sorted(tmp_path.glob("predictions.shard*-of-2.jsonl"))
    assert len(shards) == 2
    ids = [it.id for it in read_diagseg(diagseg[0])]
    single = read_predictions(single_run / "predictions.jsonl")
    assert merge_shards(shards, ids) == single
    assert merge_shards([*shards, shards[0]], ids) == single  # duplicates collapse
    # Rerun without --shard: merges, needs no model, and reports the same numbers.
    assert main(["diagseg", "--data", str(diagseg[0]), "--report", str(tmp_path), *ARGS]) == 0
    assert read_predictions(tmp_path / "predictions.jsonl") == single
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"] == json.loads((single_run / "report.json").read_text())["metrics"]


def test_torchrun_two_ranks_meet_at_a_gloo_barrier_and_rank0_reports(diagseg, single_run, tmp_path):
    """`torchrun --nproc-per-node 2`: each rank answers its shard, rank 0 merges after the barrier and reports."""
    torchrun(2, ["-m", "medsight.evaluate.cli", "diagseg", "--data", str(diagseg[0]), "--report", str(tmp_path), *ARGS],
             timeout=300)
    assert len(sorted(tmp_path.glob("predictions.shard*-of-2.jsonl"))) == 2
    assert read_predictions(tmp_path / "predictions.jsonl") == read_predictions(single_run / "predictions.jsonl")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"] == json.loads((single_run / "report.json").read_text())["metrics"]


def test_end_to_end_report_matches_predictions(diagseg, single_run):
    report = json.loads((single_run / "report.json").read_text())
    n_items = len(read_diagseg(diagseg[0]))
    assert n_items >= 5 and report["n_items"] == report["n_scored"] == n_items and report["n_missing"] == 0
    assert {"report.md", "dice.png", "recall.png"} <= {p.name for p in single_run.iterdir()}
    rows = {(r["metric"], r["group"], r["aggregate"]): r for r in report["metrics"]}
    items = {it.id: it for it in read_diagseg(diagseg[0])}
    dices, recalls, mods = [], [], []
    for rec in read_predictions(single_run / "predictions.jsonl"):
        item = items[rec["question_id"]]
        gt = np.zeros((0,))
        for p in item.masks:
            m = np.asarray(Image.open(p).convert("L")) > 127
            gt = m if gt.size == 0 else gt | m
        masks = decode_masks(rec["masks"], rec["masks"]["shape"])
        d = [2 * (m & gt).sum() / (m.sum() + gt.sum() + 1e-6) for m in masks]
        dices.append(float(np.mean(d)) if d else 0.0)
        recalls.append(precision_recall_f1(rec["text"], item.answer)[1])
        mods.append(item.modality)
    assert rows[("dice", "all", "per_sample_mean")]["value"] == pytest.approx(100 * np.mean(dices), abs=1e-4)
    assert rows[("dice", "all", "per_sample_mean")]["n"] == n_items == len(dices)
    for mod in set(mods):
        sel = [d for d, m in zip(dices, mods, strict=True) if m == mod]
        assert rows[("dice", mod, "mean")]["value"] == pytest.approx(100 * np.mean(sel), abs=1e-4)
        assert rows[("dice", mod, "mean")]["n"] == len(sel)
    macro = np.mean([np.mean([d for d, m in zip(dices, mods, strict=True) if m == mod]) for mod in set(mods)])
    assert rows[("dice", "all", "macro_mean")]["value"] == pytest.approx(100 * macro, abs=1e-4)
    assert rows[("recall", "all", "per_sample_mean")]["value"] == pytest.approx(100 * np.mean(recalls), abs=1e-4)
    lo, hi = rows[("dice", "all", "per_sample_mean")]["ci95"]
    assert lo <= rows[("dice", "all", "per_sample_mean")]["value"] <= hi
    assert rows[("dice", "MRI", "mean")]["paper"] == 82.3


def test_vqa_data_must_ask_every_scored_item_and_gives_each_its_recall(diagseg, tmp_path):
    seg, vqa = diagseg
    items = json.loads(vqa.read_text())
    renamed = tmp_path / "other_vqa.json"
    renamed.write_text(json.dumps([{**it, "qa_id": f"other_{it['qa_id']}"} for it in items]))
    reordered = tmp_path / "reordered_vqa.json"
    reordered.write_text(json.dumps(items[::-1]))
    common = ["diagseg", "--data", str(seg), *ARGS, "--max-new-tokens", "8"]
    for data, extra, named in [
        (renamed, [], rf"--vqa-data {renamed} lack {len(items)} item\(s\) of --data {seg} \('{items[0]['qa_id']}'"),
        (reordered, ["--limit", "2"], rf"the first 2 items of --vqa-data {reordered} lack 2 item\(s\)"),
    ]:
        with pytest.raises(DataError, match=rf"{named}.*whose diagnosis recall comes from that file: pass the "
                                            r"_vqa\.json file made with this data"):
            main([*common, "--vqa-data", str(data), "--report", str(tmp_path / data.stem), *extra])
        assert not (tmp_path / data.stem / "predictions.jsonl").exists()
    # The matching file: every scored item has its recall, from the separate VQA-path run.
    assert main([*common, "--vqa-data", str(vqa), "--report", str(tmp_path / "ok"), "--limit", "2"]) == 0
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    rows = {(r["metric"], r["aggregate"]): r for r in report["metrics"]}
    assert rows[("recall", "per_sample_mean")]["n"] == rows[("dice", "per_sample_mean")]["n"] == 2


def test_a_folder_answered_with_vqa_data_resumes_with_it_and_refuses_another_file(diagseg, tmp_path, capsys):
    """A DiagSeg folder answered with --vqa-data was refused when resumed without it ("seed: 0 there, null now"): the
    rerun now reuses the recorded file, saying so; a byte-identical copy is taken, another file refused naming both."""
    seg, vqa = diagseg
    items = json.loads(vqa.read_text())
    report = tmp_path / "report"
    common = ["diagseg", "--data", str(seg), *ARGS, "--max-new-tokens", "8", "--report", str(report)]
    assert main([*common, "--vqa-data", str(vqa), "--limit", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--limit", "2"]) == 0
    assert f"--vqa-data {vqa}: reused, as recorded in {report / 'settings.json'}" in capsys.readouterr().err
    answered = read_predictions(report / "predictions_vqa.jsonl")
    assert len(answered) == 2
    rows = {(r["metric"], r["aggregate"]): r for r in json.loads((report / "report.json").read_text())["metrics"]}
    assert rows[("recall", "per_sample_mean")]["n"] == 2
    copy = tmp_path / "copy_vqa.json"
    copy.write_bytes(vqa.read_bytes())
    assert main([*common, "--vqa-data", str(copy), "--limit", "2"]) == 0
    other = tmp_path / "other_vqa.json"
    other.write_text(json.dumps(items[::-1]))
    with pytest.raises(DataError, match=rf"--vqa-data {other}: {report}'s recall answers came from --vqa-data "
                                        rf"{vqa} \(recorded in {report / 'settings.json'}\)"):
        main([*common, "--vqa-data", str(other)])
    assert read_predictions(report / "predictions_vqa.jsonl") == answered


def test_torchrun_entry_point_names_bad_input_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    done = subprocess.run([sys.executable, "-m", "medsight.evaluate.cli", "vqa", "--data", str(missing), "--report",
                           str(tmp_path / "rep"), "--num-shards", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("medsight eval: error: --num-shards needs --shard too")
    done = subprocess.run([sys.executable, "-m", "medsight.evaluate.cli", "vqa", "--data", str(missing), "--report",
                           str(tmp_path / "rep")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("medsight eval: error: ") and str(missing) in done.stderr


def test_a_shard_resumed_on_another_number_of_processes_asks_nothing_answered(diagseg, single_run, tmp_path,
                                                                            monkeypatch):
    from medsight.engine import Engine

    def no_model(*a, **k):
        raise AssertionError("every item is answered: no model may be loaded")

    answers = read_predictions(single_run / "predictions.jsonl")
    (tmp_path / "settings.json").write_bytes((single_run / "settings.json").read_bytes())
    # Answered before by one process (item 0) and by 4 shards (the rest), now resumed as shard i of 2.
    (tmp_path / "predictions.jsonl").write_text(json.dumps(answers[0]) + "\n")
    for k in range(4):
        (tmp_path / f"predictions.shard{k}-of-4.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in answers[1:][k::4]))
    monkeypatch.setattr(Engine, "load", no_model)
    for i in range(2):
        assert main(["diagseg", "--data", str(diagseg[0]), "--report", str(tmp_path), "--shard", str(i),
                     "--num-shards", "2", *ARGS]) == 0
    assert not list(tmp_path.glob("predictions.shard*-of-2.jsonl"))
    assert main(["diagseg", "--data", str(diagseg[0]), "--report", str(tmp_path), *ARGS]) == 0
    assert read_predictions(tmp_path / "predictions.jsonl") == answers


def test_strict_dice_scores_the_masks_on_non_square_images(diagseg, single_run, tmp_path):
    """The same images padded left and right: the model sees the same centre crop and answers alike; the official
    Dice stretches that square frame over the wider mask, the strict Dice scores the masks on the image."""
    items = json.loads(diagseg[0].read_text())[:2]
    padded = []
    for it in items:
        for key, path in (("image_file", it["image_file"]), ("mask", it["masks"][0][1])):
            pixels = np.asarray(Image.open(path))
            pad = [(0, 0), (pixels.shape[0] // 4,) * 2] + [(0, 0)] * (pixels.ndim - 2)
            Image.fromarray(np.pad(pixels, pad)).save(tmp_path / f"{it['qa_id']}_{key}.png")
        padded.append({**it, "image_file": str(tmp_path / f"{it['qa_id']}_image_file.png"),
                       "masks": [[0, str(tmp_path / f"{it['qa_id']}_mask.png")]]})
    (tmp_path / "padded.json").write_text(json.dumps(padded))
    assert main(["diagseg", "--data", str(tmp_path / "padded.json"), "--report", str(tmp_path / "rep"), *ARGS]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {r["metric"]: r for r in report["metrics"] if r["aggregate"] == "per_sample_mean"}
    originals = {it.id: it for it in read_diagseg(diagseg[0])}
    square = []
    for rec in read_predictions(single_run / "predictions.jsonl")[:2]:
        gt = np.asarray(Image.open(originals[rec["question_id"]].masks[0]).convert("L")) > 127
        masks = decode_masks(rec["masks"], gt.shape)
        square.append(np.mean([2 * (m & gt).sum() / (m.sum() + gt.sum()) for m in masks]))
    assert rows["strict_dice"]["value"] == pytest.approx(100 * np.mean(square), abs=1e-3)
    assert rows["dice"]["value"] < rows["strict_dice"]["value"] - 10
    assert any(n.startswith("2 of 2 images are not square") for n in report["notes"])


def test_ctrl_c_under_torchrun_is_one_line_not_a_traceback_per_rank(diagseg, tmp_path):
    """Ctrl+C reaches torchrun and every rank: each rank printed its KeyboardInterrupt traceback (the entry point
    caught only bad input). Now rank 0 says "interrupted" once, as `medsight train` under torchrun does."""
    items = json.loads(diagseg[0].read_text(encoding="utf-8"))
    many = [{**item, "qa_id": f"{item['qa_id']}_{n}"} for n in range(200) for item in items]  # outlasts the wait
    data = tmp_path / "many.json"
    data.write_text(json.dumps(many), encoding="utf-8")
    args = ["-m", "medsight.evaluate.cli", "diagseg", "--data", str(data), "--report", str(tmp_path / "report"),
            *[a for a in ARGS if a != "--quiet"]]
    # Both ranks at work: each has answered its first item. The model loads at the first ask, and a Ctrl+C landing in
    # the tokenizer's load can be swallowed by the tokenizers library (PyO3 reports it as "Exception ignored"), so
    # that rank ran on until torchrun killed it 30 s later (a clean-clone CI run, where the markers were the ranks'
    # first progress lines, printed before the load).
    first = tuple(f"shard {rank}/2:   0%|          | 1/".encode() for rank in range(2))  # tqdm's line off a tty
    err = interrupt_torchrun(2, args, started=first)
    assert err.count("medsight eval: interrupted") == 1, err
    assert "KeyboardInterrupt" not in err, err


class CountingEngine:
    """Delegates to an engine, counting the asks; raises `stop` (an exception class) at ask number `stop_at`."""

    def __init__(self, engine, stop_at=None, stop=KeyboardInterrupt):
        self.engine, self.asks, self.stop_at, self.stop = engine, 0, stop_at, stop

    def ask(self, *a, **k):
        if self.asks == self.stop_at:
            raise self.stop
        self.asks += 1
        return self.engine.ask(*a, **k)


def _damaged_pixels(src, dst):
    """A PNG whose chunks and checksums are whole (Image.verify passes) but whose pixel stream does not inflate."""
    import struct
    import zlib

    data, pos, out = Path(src).read_bytes(), 8, bytearray()
    out += data[:8]
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = bytearray(data[pos + 8:pos + 8 + n])
        if kind == b"IDAT":  # after the zlib header, a deflate block of the reserved type 11
            body[2:] = b"\xff" * (n - 2)
        out += struct.pack(">I", n) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + n
    dst.write_bytes(bytes(out))


def test_a_file_that_passes_the_check_but_not_decoding_stops_the_run_saying_what_is_kept(diagseg, single_run,
                                                                                        tmp_path):
    """An image and a mask PNG with a damaged pixel stream (whole chunks and checksums) pass the check before the run,
    then stopped it part-way naming the item and file, but not that the answers before it were kept nor how to go
    on; and the damaged mask was read after its item was answered, losing that answer."""
    from medsight import Engine
    from medsight.user_files import check_user_image

    raw = json.loads(diagseg[0].read_text())
    k = len(raw) // 2
    image = tmp_path / "damaged_image.png"
    _damaged_pixels(raw[k]["image_file"], image)
    mask = tmp_path / "damaged_mask.png"
    _damaged_pixels(raw[k + 1]["masks"][0][1], mask)
    for f in (image, mask):
        check_user_image(f, "file", DataError)  # the check before the run passes both
    data = tmp_path / "data.json"
    data.write_text(json.dumps([*raw[:k], {**raw[k], "image_file": str(image)},
                                {**raw[k + 1], "masks": [[raw[k + 1]["mask_ids"][-1], str(mask)]]}, *raw[k + 2:]]))
    items, path = read_diagseg(data), tmp_path / "p.jsonl"
    engine = CountingEngine(Engine.load("demo", device="cpu"))
    options = RunOptions("diagseg", max_new_tokens=40)
    originals = {image: raw[k]["image_file"], mask: raw[k + 1]["masks"][0][1]}
    for damaged, item in ((image, items[k]), (mask, items[k + 1])):
        with pytest.raises(DataError, match=rf"item '{item.id}': cannot read the \w+ {damaged}: .*\. Mend or replace "
                                            rf"that file: {k + (damaged == mask)} of {len(items)} items are answered "
                                            rf"and kept in {path}; the same command resumes after them"):
            run_predictions(engine, items, path, options)
        assert engine.asks == len(read_predictions(path)) == k + (damaged == mask)  # no answer asked and lost
        damaged.write_bytes(Path(originals[damaged]).read_bytes())  # mended: the run goes on from the kept answers
    assert run_predictions(engine, items, path, options) == read_predictions(single_run / "predictions.jsonl")
    assert engine.asks == len(items)


def test_ctrl_c_says_how_many_answers_are_kept_and_how_to_resume(diagseg, single_run, tmp_path, capsys):
    """Ctrl+C ended the run with 'interrupted' alone: nothing said the answers so far were kept or that the same
    command goes on from them (nor, for a shard, that some are in the report's other files)."""
    from medsight import Engine

    items, path = read_diagseg(diagseg[0]), tmp_path / "p.jsonl"
    engine, options = Engine.load("demo", device="cpu"), RunOptions("diagseg", max_new_tokens=8)
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        run_predictions(CountingEngine(engine, stop_at), items, path, options)
    assert len(read_predictions(path)) == stop_at
    assert (f"{stop_at} of {len(items)} items are answered and kept in {path}; the same command resumes after them"
            in capsys.readouterr().err)
    # A resumed shard: the next item was answered by another process, in another file.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(read_predictions(single_run / "predictions.jsonl")[stop_at]) + "\n")
    with pytest.raises(KeyboardInterrupt):
        run_predictions(CountingEngine(engine, 1), items, path, options, answered=[other])
    assert (f"{stop_at + 2} of {len(items)} items are answered and kept in {path} and the report's other "
            "predictions files; the same command resumes" in capsys.readouterr().err)


def test_a_full_disk_while_answering_names_the_predictions_file_and_what_is_kept(diagseg, tmp_path):
    """A disk that filled up part-way ended `medsight eval` with 'error: File too large' alone: no file named, nothing
    said of the answers kept or that the same command goes on from them. The torn last line is mended on resume."""
    from medsight import Engine
    from medsight.commands.errors import error_message

    items, path = read_diagseg(diagseg[0]), tmp_path / "p.jsonl"
    engine, options = Engine.load("demo", device="cpu"), RunOptions("diagseg", max_new_tokens=8)
    kept = 1
    run_predictions(engine, items, path, options, limit=kept)
    with file_size_limit(path.stat().st_size + 1), pytest.raises(OSError) as full:
        run_predictions(engine, items, path, options)
    assert error_message(full.value) == (f"{path}: File too large; {kept} of {len(items)} items are answered and kept "
                                         f"in {path}; the same command resumes after them (the report is written "
                                         "once every item is answered)")
    assert len(run_predictions(engine, items, path, options)) == len(items)


def test_a_predictions_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """A byte that is not UTF-8 (a hand edit in another encoding) stopped `medsight eval` with "'utf-8' codec can't
    decode byte 0xe9 in position 6439", naming neither the file nor the line."""
    path = tmp_path / "predictions.jsonl"
    good = [{"question_id": str(i), "text": "liver"} for i in range(3)]
    path.write_bytes("".join(json.dumps(r) + "\n" for r in good).encode() + b'{"question_id": "x\xe9", "text": "a"}\n')
    with pytest.raises(DataError, match=rf"{path}: line {len(good) + 1} is not UTF-8 text \(invalid continuation "
                                        r"byte\); a predictions file holds one JSON object per line"):
        read_predictions(path)
