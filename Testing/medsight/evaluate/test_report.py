"""Scoring VQA and multiple-choice predictions without a model; report files."""

from collections import Counter
from pathlib import Path

import pytest

from medsight.evaluate.readers import DataError, EvalItem
from medsight.evaluate.report import PAPER_DIAGSEG, PAPER_MC, ItemScore, aggregate, build_report, write_report


def _item(i, answer, kind, modality="CT", options=()):
    return EvalItem(str(i), "q", answer, kind, Path("/x.png"), modality, list(options))


def test_vqa_report(tmp_path):
    items = [_item(1, "yes", "closed"), _item(2, "no", "closed"), _item(3, "brain tumor", "open"),
             _item(4, "liver", "open")]
    preds = [{"question_id": i, "text": t} for i, t in
             [("1", "Yes."), ("2", "It is normal"), ("3", "tumor"), ("4", "the liver")]]
    report = build_report("vqa", items, preds, n_boot=50, benchmark="vqa-rad")
    rows = {(r["metric"], r["aggregate"]): r for r in report["metrics"]}
    assert rows[("closed_accuracy", "per_sample_mean")]["value"] == 100.0  # "no" in "normal" counts
    assert rows[("strict_closed_accuracy", "per_sample_mean")]["value"] == 50.0
    assert rows[("recall", "per_sample_mean")]["value"] == pytest.approx(75.0)  # (1/2 + 1) / 2
    # The paper's "all" (61.4) is an overall recall: open recall and closed hits over all 4 items, (1+1+1/2+1)/4.
    assert rows[("recall", "per_sample_mean")]["paper"] is None
    assert rows[("recall_all", "per_sample_mean")]["value"] == pytest.approx(87.5)
    overall = rows[("recall_all", "per_sample_mean")]
    assert overall["paper"] == 61.4 and overall["n"] == len(items)
    assert rows[("exact_match", "per_sample_mean")]["value"] == 100.0 and rows[("strict_exact", "per_sample_mean")][
        "value"] == 50.0
    paths = write_report(report, tmp_path)
    assert paths["recall"].is_file() and "| recall | all | per_sample_mean | 75.00 |" in paths["md"].read_text()


def test_mc_report_per_modality_and_missing():
    opts = ["Liver", "Lung", "Brain"]
    items = [_item(1, "Liver", "mc", "CT", opts), _item(2, "Lung", "mc", "CT", opts),
             _item(3, "Brain", "mc", "MRI", opts), _item(4, "Brain", "mc", "MRI", opts)]
    preds = [{"question_id": "1", "text": "liver"}, {"question_id": "2", "text": "brain"},
             {"question_id": "3", "text": "The brain"}]
    report = build_report("mc", items, preds, n_boot=50)
    assert report["n_missing"] == 1
    rows = {(r["group"], r["aggregate"]): r for r in report["metrics"]}
    assert rows[("CT", "mean")]["value"] == 50.0 and rows[("MRI", "mean")]["value"] == 100.0
    assert rows[("all", "macro_mean")]["value"] == 75.0 and rows[("all", "macro_mean")]["paper"] == 68.9
    assert rows[("all", "per_sample_mean")]["value"] == pytest.approx(200 / 3, abs=1e-3)
    assert any("68.9 is set beside the macro mean" in n for n in report["notes"])  # the inferred choice, said


def test_an_mc_item_without_options_is_named():
    """build_report stopped with "no options to choose from", naming neither the item nor what it lacks."""
    items = [_item(1, "Liver", "mc", options=["Liver", "Lung"]), _item(2, "Liver", "mc")]
    preds = [{"question_id": it.id, "text": "liver"} for it in items]
    with pytest.raises(DataError, match="item '2': answer type 'mc' without options to score the answer against"):
        build_report("mc", items, preds, n_boot=5)
    assert build_report("mc", items[:1], preds, n_boot=5)["metrics"][0]["value"] == 100.0


@pytest.mark.parametrize("width", [12, 8])
def test_diagseg_report_says_when_dice_stretches_the_square_input_frame(tmp_path, width):
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import encode_masks

    gt = np.zeros((8, width), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((8, width, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    items = [EvalItem("1", "q", "lesion", "open", tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])]
    half = gt.copy()
    half[2:4] = False
    preds = [{"question_id": "1", "text": "lesion", "masks": encode_masks([gt], gt.shape),
              "masks_image": encode_masks([half], gt.shape)}]
    report = build_report("diagseg", items, preds, n_boot=5)
    rows = {r["metric"]: r["value"] for r in report["metrics"]}
    assert rows["dice"] == 100.0 and rows["strict_dice"] == pytest.approx(100 * 2 * 8 / (16 + 8), abs=1e-4)
    stretched = [n for n in report["notes"] if "images are not square" in n]
    note = ("1 of 1 images are not square: their Dice follows the official notebooks, which stretch the model's "
            "square input frame (the centre crop, or the letterbox) over the whole GT mask, so it does not measure the "
            "mask on the image (DiagSeg's images are square); strict_dice does")
    assert stretched == ([] if width == 8 else [note])


@pytest.mark.parametrize("mask_shape", [(8, 8), (16, 16), (8, 4)])
def test_diagseg_report_says_when_gt_masks_have_another_shape_than_their_image(tmp_path, mask_shape):
    """A GT mask half as wide as its square image was scored with no word (on the demo data, one such item of 3 took
    the run's dice and strict_dice from 86.75 to 57.29): the engine's mask was stretched onto it. A mask at another
    resolution of the image's shape scales onto it, and is not named."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import encode_masks

    image = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    gt = np.ones(mask_shape, bool)
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    items = [EvalItem("1", "q", "lesion", "open", tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])]
    preds = [{"question_id": "1", "text": "lesion", "masks": encode_masks([gt], gt.shape),
              "masks_image": encode_masks([gt], gt.shape)}]
    report = build_report("diagseg", items, preds, n_boot=5)
    note = ("1 of 1 items have GT masks of another aspect ratio than their image: both Dice stretch the masks onto "
            "those GT masks, so neither measures the mask on the image (check that the masks belong to these images)")
    other_aspect = mask_shape[0] * image.shape[1] != mask_shape[1] * image.shape[0]
    assert [n for n in report["notes"] if "aspect ratio" in n] == ([note] if other_aspect else [])


@pytest.mark.parametrize("label", [255, 1])
def test_diagseg_report_says_how_many_gt_masks_are_empty(tmp_path, label):
    """A GT mask stored as 0/1 labels reads as empty at the notebooks' > 127: on the demo data one such item of 3
    took the run's Dice from 86.75 to 57.29, without a word."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import encode_masks

    gt = np.zeros((8, 8), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * label).save(tmp_path / "mask.png")
    items = [EvalItem("1", "q", "lesion", "open", tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])]
    preds = [{"question_id": "1", "text": "lesion", "masks": encode_masks([gt], gt.shape)}]
    report = build_report("diagseg", items, preds, n_boot=5)
    dice = next(r["value"] for r in report["metrics"] if r["metric"] == "dice")
    notes = [n for n in report["notes"] if "empty GT mask" in n]
    if label == 255:
        assert dice == 100.0 and notes == []
    else:
        assert dice == 0.0 and notes == [
            "1 of 1 items have an empty GT mask (no pixel above 127, the notebooks' threshold: masks stored as 0/1 "
            "labels read as empty); their Dice is 0 for any predicted mask"]


def test_diagseg_report_scores_every_answer_type_of_the_file_and_counts_them(tmp_path):
    """A DiagSeg file with closed items beside the open ones: run_eval.py scores them by the yes/no rule; the report
    left them out of every row (recall n 2 of 3 scored items) without saying so."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.report import to_markdown
    from medsight.evaluate.runner import encode_masks

    gt = np.zeros((8, 8), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    kinds = {"1": ("cyst", "open", "a cyst"), "2": ("tumor", "other", "tumor"), "3": ("yes", "CLOSED", "Yes."),
             "4": ("no", "closed", None)}  # item 4 is not answered yet
    items = [EvalItem(i, "q", gt_text, kind, tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])
             for i, (gt_text, kind, _) in kinds.items()]
    preds = [{"question_id": i, "text": text, "masks": encode_masks([gt], gt.shape)}
             for i, (_, _, text) in kinds.items() if text is not None]
    report = build_report("diagseg", items, preds, n_boot=5)
    rows = {r["metric"]: r for r in report["metrics"] if r["aggregate"] == "per_sample_mean"}
    n_open = sum(kind == "open" for _, kind, _ in kinds.values())  # 'other' is scored by no text metric
    assert rows["dice"]["n"] == len(preds) and rows["recall"]["n"] == n_open
    assert rows["closed_accuracy"]["n"] == 1 and rows["closed_accuracy"]["value"] == 100.0
    assert report["answer_types"] == {"open": {"items": n_open, "scored": n_open, "skipped": 0},
                                      "closed": {"items": 2, "scored": 1, "skipped": 1}}
    assert report["unscored_answer_types"] == {"other": 1}
    assert ("Answer types: open 1 of 1 scored (recall); closed 1 of 2 scored, 1 skipped (closed_accuracy); 1 item(s) "
            "of another answer type (1 'other') have no text score: run_eval.py scores only the types 'open' and "
            "'close...' and skips the others, so they are skipped here too." in to_markdown(report))


def test_answer_types_run_eval_skips_are_skipped_and_named(tmp_path):
    """An answer type that is neither "open" nor "close..." was scored as open ('other', 'yesno', 'MC', 'open ' with
    a space: recall n 6 where run_eval.py scores 1); the official script skips such items, and now so does the
    report, naming each type and its count ('mc' of a VQA file has no options: skipped, not multiple choice)."""
    import json

    from medsight.evaluate.readers import read_llava_vqa
    from medsight.evaluate.report import to_markdown

    kinds = ["OPEN", "Closed", "close-ended", "other", "open ", "yesno", "other", "MC"]
    raw = [{"id": i, "image": "i.png", "answer_type": kind, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "liver"}]}
        for i, kind in enumerate(kinds)]
    (tmp_path / "test.json").write_text(json.dumps(raw))
    items = read_llava_vqa(tmp_path / "test.json")
    preds = [{"question_id": it.id, "text": "the liver"} for it in items]
    report = build_report("vqa", items, preds, n_boot=5)

    # The official branches, re-implemented: == "open" is open, startswith("close") closed, the rest skipped.
    official_open = [k for k in kinds if k.lower() == "open"]
    official_closed = [k for k in kinds if k.lower().startswith("close")]
    skipped = {k.lower(): kinds.count(k) for k in kinds if k not in official_open + official_closed}
    rows = {r["metric"]: r for r in report["metrics"] if r["aggregate"] == "per_sample_mean"}
    assert rows["recall"]["n"] == len(official_open) and rows["closed_accuracy"]["n"] == len(official_closed)
    assert rows["recall_all"]["n"] == len(official_open) + len(official_closed)
    # 'mc' too: the report scored it as multiple choice and stopped after the whole run ("without options").
    assert report["unscored_answer_types"] == skipped == {"other": 2, "open ": 1, "yesno": 1, "mc": 1}
    assert ("5 item(s) of another answer type (2 'other', 1 'open ', 1 'yesno', 1 'mc') have no text score"
            in to_markdown(report))
    # A file of such types alone: no row at all, and report.md still says why.
    only = [it for it in items if it.answer_type in skipped]
    report = build_report("vqa", only, preds, n_boot=5)
    assert report["metrics"] == [] and report["answer_types"] == {}
    assert "Answer types: 5 item(s) of another answer type" in to_markdown(report)


@pytest.mark.parametrize("damage, problem", [
    ({"rle": 5}, r"masks: stored masks: expected \{\"shape\": \[H, W\], \"rle\": \[counts of each mask\]\}"),
    ({"rle": [[None]]}, "masks: stored mask: "),
    ({"rle": [[1, 2]]}, r"masks: stored mask: RLE counts sum to 3, expected \d+"),
    ("x", r"masks shape None != GT \(\d+, \d+\)"),
])
def test_damaged_stored_masks_are_named_with_their_prediction(tmp_path, damage, problem):
    """A damaged predictions file stopped the report with a TypeError traceback ('int' object is not iterable,
    string indices must be integers) or 'stored mask: ...' naming no prediction."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import encode_masks

    gt = np.zeros((8, 8), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    items = [EvalItem(str(i), "q", "lesion", "open", tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])
             for i in range(2)]
    stored = encode_masks([gt], gt.shape)
    damaged = {**stored, **damage} if isinstance(damage, dict) else damage
    preds = [{"question_id": "0", "text": "lesion", "masks": stored},
             {"question_id": "1", "text": "lesion", "masks": damaged}]
    assert build_report("diagseg", items[:1], preds[:1], n_boot=5)["metrics"][0]["value"] == 100.0
    with pytest.raises(DataError, match=rf"prediction '1': {problem}"):
        build_report("diagseg", items, preds, n_boot=5)


def test_a_failed_report_write_leaves_the_previous_report_whole_and_no_chart_of_another_run(tmp_path, monkeypatch):
    """write_report wrote report.json, report.md and each chart one by one: a chart that failed (a full disk) left
    the new report.json beside the previous run's charts, and a chart the new report has no rows for (no closed
    item in a --limit run) stayed from the run before."""
    import matplotlib.figure

    from medsight.evaluate.report import CHART_METRICS

    items = [_item(1, "brain", "open"), _item(2, "yes", "closed"), _item(3, "liver", "open")]
    first = build_report("vqa", items[:2], [{"question_id": "1", "text": "brain"},
                                            {"question_id": "2", "text": "yes"}], n_boot=5)
    written = write_report(first, tmp_path)
    charts = CHART_METRICS["vqa"]
    assert set(written) == {"json", "md", *charts}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = build_report("vqa", items, [{"question_id": "1", "text": "lung"}, {"question_id": "2", "text": "no"},
                                         {"question_id": "3", "text": "liver"}], n_boot=5)
    save = matplotlib.figure.Figure.savefig
    saved = []

    def disk_full_at_the_last_chart(fig, *args, **kwargs):
        saved.append(args[0])
        if len(saved) == len(charts):
            raise OSError(28, "No space left on device")
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full_at_the_last_chart)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(second, tmp_path)
    assert len(saved) == len(charts)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # whole, no temporary left
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    open_only = build_report("vqa", items[:1], [{"question_id": "1", "text": "brain"}], n_boot=5)
    written = write_report(open_only, tmp_path)
    kept = [m for m in charts if any(r["metric"] == m for r in open_only["metrics"])]
    assert 0 < len(kept) < len(charts) and set(written) == {"json", "md", *kept}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.json", "report.md",
                                                                 *(f"{m}.png" for m in kept)])


def _official_notebook_dice(logits, mask_files):
    """The DiagSeg notebooks' Dice, re-implemented: each GT file Image.open().convert('L') > 127 (no resize), union
    (> 0.5), the (K, m, m) logits resized bilinearly onto the GT grid, > 0, (2I + 1e-8) / (|P| + |G| + 1e-8) per
    channel, mean."""
    import numpy as np
    import torch
    from PIL import Image

    gts = [torch.from_numpy((np.array(Image.open(f).convert("L")) > 127).astype(np.float32)) for f in mask_files]
    union = torch.zeros_like(gts[0], dtype=torch.bool)
    for g in gts:
        union = union | (g > 0.5)
    gt = union.float()[None]
    pred = torch.nn.functional.interpolate(logits[:, None].float(), size=gt.shape[-2:], mode="bilinear",
                                           align_corners=False)[:, 0]
    pred = (pred > 0).float()
    inter = (pred * gt).sum(dim=(-2, -1))
    return ((2.0 * inter + 1e-8) / (pred.sum(dim=(-2, -1)) + gt.sum(dim=(-2, -1)) + 1e-8)).mean().item()


def test_dice_on_gt_masks_of_every_kind_equals_the_official_notebooks(tmp_path):
    """GT masks as data sets store them (RGB, palette, 16-bit, anti-aliased grey, 0/1 labels, with alpha, another
    resolution than the model's mask grid, several files per item): the report's Dice equals the notebooks' rule."""
    import numpy as np
    import torch
    from PIL import Image

    from medsight.evaluate.metrics import binarize_logits
    from medsight.evaluate.report import score_items
    from medsight.evaluate.runner import encode_masks

    h, w = 40, 56  # not the logits' square grid: both resize the logits onto the GT mask
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 18) ** 2 + (xx - 30) ** 2 < 150
    grey = np.clip(255 - 4 * np.hypot(yy - 20, xx - 25), 0, 255).astype(np.uint8)  # soft edge around 127
    palette = Image.fromarray(disk.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    masks = {
        "rgb_white": Image.fromarray(np.stack([disk * 255] * 3, -1).astype(np.uint8)),
        "rgb_red": Image.fromarray(np.stack([disk * 255, 0 * disk, 0 * disk], -1).astype(np.uint8)),  # L 76: empty
        "palette": palette,
        "uint16_full": Image.fromarray((disk * 65535).astype(np.uint16)),
        "uint16_low": Image.fromarray((disk * 200).astype(np.uint16)),
        "grey": Image.fromarray(grey),
        "labels01": Image.fromarray(disk.astype(np.uint8)),  # empty at > 127
        "la": Image.fromarray(np.stack([disk * 255, np.full_like(disk, 255)], -1).astype(np.uint8), "LA"),
        "half_res": Image.fromarray((disk[::2, ::2] * 255).astype(np.uint8)),
    }
    files = {}
    for name, im in masks.items():
        files[name] = tmp_path / f"{name}.png"
        im.save(files[name])
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "img.png")
    cases = {name: [f] for name, f in files.items()} | {"union": [files["grey"], files["rgb_white"]]}
    logits = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(0)) + 0.3
    items, preds, expected = [], [], {}
    for name, paths in cases.items():
        items.append(EvalItem(name, "q", "a", "open", tmp_path / "img.png", "CT", masks=paths))
        shape = np.asarray(Image.open(paths[0])).shape[:2]
        preds.append({"question_id": name, "text": "a", "masks": encode_masks(binarize_logits(logits, shape), shape)})
        expected[name] = _official_notebook_dice(logits, paths)
    report_scores = {s.id: s.scores["dice"] for s in score_items(items, preds, with_dice=True)}
    assert report_scores == pytest.approx(expected, abs=1e-6)
    assert expected["rgb_red"] == expected["labels01"] < 1e-6  # empty GT: the notebooks score ~0 too
    assert len({round(v, 9) for v in expected.values()}) > 3  # the masks differ, so the comparison has teeth


def test_images_of_more_than_8_bits_are_counted_in_the_notes(tmp_path):
    """A 16-bit PNG is read as the official convert('RGB') reads it, every value above 255 clipped to white: a CT
    slice of 0..4000 reached the model almost white (99.6 % of its pixels 255) and the report said nothing."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import item_image

    ramp = np.arange(0, 64 * 64 * 16, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ct16.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "ct8.png")
    items = [EvalItem("1", "q", "liver", "open", tmp_path / "ct16.png"),
             EvalItem("2", "q", "liver", "open", tmp_path / "ct8.png"),
             EvalItem("3", "q2", "liver", "open", tmp_path / "ct16.png")]  # one file, counted once
    official = np.asarray(Image.open(tmp_path / "ct16.png").convert("RGB"))
    assert np.array_equal(item_image(items[0]), official) and (official == 255).mean() > 0.99
    report = build_report("vqa", items, [{"question_id": it.id, "text": "liver"} for it in items], n_boot=5)
    assert [n for n in report["notes"] if "bits per pixel" in n] == [
        "1 of 2 images have more than 8 bits per pixel (16-bit or float): they are read as the official code reads "
        "them (PIL convert('RGB')), which clips every value above 255 to white, so a 16-bit CT or MR slice reaches "
        "the model almost white; convert them to 8-bit with the intended window first"]


def test_image_headers_are_read_once_per_file_and_a_decompression_bomb_is_not_counted(tmp_path, monkeypatch):
    """The note counts opened every item's image (3 opens of an image 3 items share, whose docstring said once per
    image), and PIL's DecompressionBombError, which is neither an OSError nor a ValueError, stopped the report being
    built. PIL's own limit is lowered so that a small image is such a "bomb". The image is 16-bit so that its header,
    read, gives a note, absent when the header cannot be read."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((8, 12), np.uint16)).save(tmp_path / "wide.png")
    items = [EvalItem(str(i), "q", "liver", "open", tmp_path / "wide.png") for i in range(3)]
    preds = [{"question_id": it.id, "text": "liver"} for it in items]
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    report = build_report("vqa", items, preds, n_boot=5)
    assert opened.count("wide.png") == 1 and report["n_scored"] == len(items)
    assert [n for n in report["notes"] if n.startswith("1 of 1 images have more than 8 bits per pixel")]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8 * 12 // 2 - 1)  # 8 x 12 is past twice the limit: a "bomb"
    with pytest.raises(Image.DecompressionBombError):
        real_open(tmp_path / "wide.png")
    report = build_report("vqa", items, preds, n_boot=5)
    assert report["n_scored"] == len(items) and not [n for n in report["notes"] if "bits per pixel" in n]


def test_vqa_paper_numbers_stand_beside_the_pooled_mean_when_the_data_names_modalities():
    """run_eval.py's yes/no accuracy and recall pool every item; a file with a modality field set the paper's
    VQA-RAD close 79.9 beside the macro mean over modalities (here 75.0), not the pooled accuracy (66.7)."""
    items = [_item(1, "yes", "closed", "CT"), _item(2, "no", "closed", "CT"), _item(3, "yes", "closed", "MRI")]
    preds = [{"question_id": i, "text": t} for i, t in [("1", "yes"), ("2", "yes"), ("3", "yes")]]
    report = build_report("vqa", items, preds, n_boot=20, benchmark="vqa-rad")
    rows = {(r["metric"], r["aggregate"]): r for r in report["metrics"]}
    pooled, macro = rows[("closed_accuracy", "per_sample_mean")], rows[("closed_accuracy", "macro_mean")]
    assert pooled["value"] == pytest.approx(100 * 2 / len(items), abs=1e-3) and macro["value"] == 75.0
    assert pooled["paper"] == 79.9 and macro["paper"] is None
    overall = rows[("recall_all", "per_sample_mean")]
    assert overall["paper"] == 61.4 and rows[("recall_all", "macro_mean")]["paper"] is None


def test_a_single_modality_is_compared_with_the_papers_number_for_it_not_the_average_over_all():
    """A CT-only DiagSeg run set its Dice beside the paper's average over eight modalities (69.9), not CT's 65.8 (and
    its recall beside 58.9, not 54.6); one OmniMedVQA Modality_*.json file beside 68.9, the mean over 7 files."""
    ct = [ItemScore(str(i), "CT", {"dice": d, "recall": 1.0}) for i, d in enumerate([0.5, 0.9])]
    for metric, paper_avg in (("dice", "per_sample_mean"), ("recall", "macro_mean")):
        (row,) = aggregate(ct, metric, n_boot=5, paper=PAPER_DIAGSEG[metric], paper_avg=paper_avg)
        assert row["paper"] == PAPER_DIAGSEG[metric]["CT"] and row["n"] == len(ct)
        (other,) = aggregate([ItemScore("1", "PET", {metric: 0.5})], metric, n_boot=5, paper=PAPER_DIAGSEG[metric],
                             paper_avg=paper_avg)
        assert other["paper"] is None  # the paper has no PET column
        (unsplit,) = aggregate([ItemScore("1", "unknown", {metric: 0.5})], metric, n_boot=5,
                               paper=PAPER_DIAGSEG[metric], paper_avg=paper_avg)
        assert unsplit["paper"] == PAPER_DIAGSEG[metric]["avg"]  # no modality named: the whole benchmark
    opts = ["Liver", "Lung"]
    items = [_item(1, "Liver", "mc", "CT", opts), _item(2, "Lung", "mc", "CT", opts)]
    report = build_report("mc", items, [{"question_id": it.id, "text": it.answer} for it in items], n_boot=5)
    assert [(r["group"], r["value"], r["paper"]) for r in report["metrics"]] == [("all", 100.0, None)]
    # A pooled VQA benchmark keeps its number whatever one modality its file names.
    vqa = build_report("vqa", [_item(1, "yes", "closed", "CT")], [{"question_id": "1", "text": "yes"}], n_boot=5,
                       benchmark="slake")
    assert {r["metric"]: r["paper"] for r in vqa["metrics"]}["closed_accuracy"] == 70.9


def test_a_single_modality_reports_notes_name_the_comparison_its_rows_make(tmp_path):
    """A one-modality report's notes said the paper's averages were set beside it: one OmniMedVQA file's report said
    '68.9 is set beside the macro mean over modalities' with no macro mean row and no paper number; a CT-only DiagSeg
    report explained the Dice avg 69.9 while its rows held CT's numbers. The notes now name what the rows hold."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.runner import encode_masks

    opts = ["Liver", "Lung"]
    items = [_item(1, "Liver", "mc", "CT", opts), _item(2, "Lung", "mc", "CT", opts)]
    mc = build_report("mc", items, [{"question_id": it.id, "text": it.answer} for it in items], n_boot=5)
    assert [r["paper"] for r in mc["metrics"]] == [None]
    assert not [n for n in mc["notes"] if str(PAPER_MC["avg"]) in n]
    assert "every item is of one modality (CT): the paper has no number for it alone (its average spans other " \
           "modalities), so none is set beside it" in mc["notes"]

    gt = np.zeros((8, 8), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    seg = [EvalItem("1", "q", "lesion", "open", tmp_path / "img.png", "CT", masks=[tmp_path / "mask.png"])]
    preds = [{"question_id": "1", "text": "lesion", "masks": encode_masks([gt], gt.shape)}]
    report = build_report("diagseg", seg, preds, n_boot=5)
    papers = {r["metric"]: r["paper"] for r in report["metrics"] if r["paper"] is not None}
    assert papers == {m: PAPER_DIAGSEG[m]["CT"] for m in ("dice", "recall")}
    numbers = ", ".join(f"{m} {p}" for m, p in papers.items())
    assert f"every item is of one modality (CT): the paper's numbers for it ({numbers}) are set beside the " \
           "per-sample mean" in report["notes"]
    assert not [n for n in report["notes"] if str(PAPER_DIAGSEG["dice"]["avg"]) in n]


def test_modalities_spelled_otherwise_get_the_papers_numbers_and_one_group(tmp_path):
    """SLAKE's "X-Ray" (and "xray", "X ray") was no X-ray: its Dice and recall rows got no paper number, and a file
    with two spellings reported two groups. Case, hyphens and spaces no longer count; other modalities stay apart."""
    import numpy as np
    from PIL import Image

    from medsight.evaluate.readers import read_diagseg
    from medsight.evaluate.runner import encode_masks

    gt = np.zeros((8, 8), bool)
    gt[2:6, 3:7] = True
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    spelled = {"X-Ray": "X-ray", "xray": "X-ray", "X ray": "X-ray", "mri": "MRI", "Microscopy": "Microscopy",
               "PET-CT": "PET-CT", "OCTA": "OCTA"}
    data = [{"qa_id": i, "question": "q", "short_answer": "lesion", "image_file": "img.png", "mask_ids": [1],
             "masks": [[1, "mask.png"]], "answer_type": "open", "modality": name} for i, name in enumerate(spelled)]
    items = read_diagseg(_write_json(tmp_path / "seg.json", data))
    assert [it.modality for it in items] == list(spelled.values())
    preds = [{"question_id": it.id, "text": "lesion", "masks": encode_masks([gt], gt.shape)} for it in items]
    report = build_report("diagseg", items, preds, n_boot=5)
    rows = {(r["metric"], r["group"]): r for r in report["metrics"] if r["aggregate"] == "mean"}
    groups = sorted(set(spelled.values()))
    assert sorted(g for m, g in rows if m == "dice") == groups
    for metric in ("dice", "recall"):
        assert {g: rows[(metric, g)]["paper"] for g in groups} == {g: PAPER_DIAGSEG[metric].get(g) for g in groups}
    assert rows[("dice", "X-ray")]["n"] == list(spelled.values()).count("X-ray")
    assert rows[("dice", "X-ray")]["paper"] == PAPER_DIAGSEG["dice"]["X-ray"]
    from medsight.evaluate.metrics import PAPER_MODALITIES  # the names folded to are the table's

    assert set(PAPER_MODALITIES) | {"avg"} == set(PAPER_DIAGSEG["dice"]) == set(PAPER_DIAGSEG["recall"])


def test_spellings_of_a_modality_outside_the_papers_table_make_one_group(tmp_path):
    """ "Fundus", "FUNDUS" and "fundus" (or "PET-CT" and "pet ct") in one file were a group each in the report; they
    are now one, under the spelling most of their items use (the first on a tie), with every item counted. An
    OmniMedVQA folder's Modality_*.json files differ the same way only on a case-sensitive file system."""
    from PIL import Image

    from medsight.evaluate.readers import read_llava_vqa, read_omnimed

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    spelled = ["FUNDUS", "Fundus", "fundus", "Fundus", "PET-CT", "pet ct", "Microscopy", "Ultrasound", "ULTRASOUND"]
    shown = {"FUNDUS": "Fundus", "Fundus": "Fundus", "fundus": "Fundus", "PET-CT": "PET-CT", "pet ct": "PET-CT",
             "Microscopy": "Microscopy", "Ultrasound": "US", "ULTRASOUND": "US"}
    data = [{"id": i, "image": "img.png", "answer_type": "CLOSED", "modality": name,
             "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "yes"}]}
            for i, name in enumerate(spelled)]
    items = read_llava_vqa(_write_json(tmp_path / "vqa.json", data))
    assert [it.modality for it in items] == [shown[name] for name in spelled]
    report = build_report("vqa", items, [{"question_id": it.id, "text": "yes"} for it in items], n_boot=5)
    groups = {r["group"]: r["n"] for r in report["metrics"] if r["metric"] == "closed_accuracy"
              and r["aggregate"] == "mean"}
    want = {name: sum(shown[s] == name for s in spelled) for name in set(shown.values())}
    assert groups == want and sum(groups.values()) == len(spelled)
    folder = tmp_path / "omni"
    folder.mkdir()
    for n, name in enumerate(("Pet", "PET", "OCT")):  # Fundus is an OmniMedVQA modality of the paper's now
        _write_json(folder / f"Modality_{name}.json", [
            {"question_id": f"{name}{i}", "question": "q", "gt_answer": "A", "option_A": "A", "option_B": "B",
             "image_path": "../img.png"} for i in range(n + 1)])
    if len(list(folder.iterdir())) == 3:
        counts = Counter(it.modality for it in read_omnimed(folder))
        assert counts == {"PET": 1 + 2, "OCT": 3}  # Pet's 1 item and PET's 2: PET's spelling


def _write_json(path, obj):
    import json

    path.write_text(json.dumps(obj))
    return path


#: The released OmniMedVQA's QA files (QA_information/Open-access/<data set>.json), with their items' real
#: ``modality_type`` values (typos and the unclosed "(" included), and the paper's spelling a report must group each
#: under; Colposcopy (an OmniMedVQA modality outside the paper's) stays as written.
OMNIMED_FILES = {
    "ACRIMA": ("Fundus Photography", "Fundus"), "BUSI": ("ultrasound", "US"),
    "Blood Cell": ("Microscopy Images", "Microscopy"), "Chest CT Scan": ("CT(Computed Tomography)", "CT"),
    "Covid CT": ("CT(Computed Tomography)", "CT"), "ISIC2018": ("Dermoscopy", "Dermoscopy"),
    "OCT & X-ray 2017": ("OCT (Optical Coherence Tomography", "OCT"),
    "RadImageNet": ("MR (Mag-netic Resonance Imaging)", "MRI"), "Chest X-ray PA": ("X-Ray", "X-ray"),
    "Colposcopy Set": ("Colposcopy", "Colposcopy"),
}


def test_the_released_omnimedvqa_files_are_grouped_by_the_papers_modalities(tmp_path):
    """A report on the released QA_information/Open-access folder (one file per source data set) grouped items by
    file name: 10 groups named after data sets ("Chest CT Scan", "Covid CT", "RadImageNet"), none a row of the
    paper, and its macro mean averaged data sets. Items are now grouped by their modality_type in the paper's
    spellings, and a modality the paper's OmniMedVQA files leave out is kept and named with its count."""
    import json

    from medsight.evaluate.readers import read_omnimed

    root = tmp_path / "OmniMedVQA"
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    want: Counter = Counter()
    for n, (data_set, (modality_type, paper)) in enumerate(OMNIMED_FILES.items(), 1):
        items = [{"dataset": data_set, "question_id": f"{data_set}_{k:04d}", "question_type": "Modality Recognition",
                  "question": "What imaging technique was employed to obtain this picture?", "gt_answer": "CT scan",
                  "image_path": f"Images/{data_set}/{k}.png", "option_A": "PET scan", "option_B": "CT scan",
                  "option_C": "Blood test", "option_D": "Fundus imaging", "modality_type": modality_type}
                 for k in range(n)]
        if data_set == "Chest CT Scan":  # the release's one item naming the field "modality"
            items[0]["modality"] = items[0].pop("modality_type")
        (qa / f"{data_set}.json").write_text(json.dumps(items))
        want[paper] += n
    items = read_omnimed(qa, root)
    assert Counter(it.modality for it in items) == want
    report = build_report("mc", items, [{"question_id": it.id, "text": it.answer} for it in items], n_boot=5)
    groups = {r["group"]: r["n"] for r in report["metrics"] if r["aggregate"] == "mean"}
    assert groups == want and len(groups) == len(set(p for _, p in OMNIMED_FILES.values()))
    from medsight.evaluate.metrics import OMNIMED_MODALITIES  # the paper's OmniMedVQA rows

    outside = {m: n for m, n in want.items() if m not in OMNIMED_MODALITIES}
    assert report["modalities_not_in_paper"] == outside == {"Dermoscopy": want["Dermoscopy"],
                                                            "Colposcopy": want["Colposcopy"]}
    named = ", ".join(f"{m} ({n} items)" for m, n in sorted(outside.items()))
    assert [n for n in report["notes"] if f"with no paper number: {named};" in n]
    # The paper's average spans only its own modalities: it stands beside no row that also holds other ones.
    assert [r["paper"] for r in report["metrics"] if r["group"] == "all"] == [None, None]
    kept = [it for it in items if it.modality in OMNIMED_MODALITIES]
    paper_only = build_report("mc", kept, [{"question_id": it.id, "text": it.answer} for it in kept], n_boot=5)
    assert "modalities_not_in_paper" not in paper_only or not paper_only["modalities_not_in_paper"]
    assert [r["paper"] for r in paper_only["metrics"] if r["aggregate"] == "macro_mean"] == [PAPER_MC["avg"]]
    # The paper's own per-modality files (Modality_X-Ray.json ...) group as the released files do.
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("CT", "OCT", "X-Ray", "MRI", "ultrasound", "Microscopy", "Fundus"):
        (shards / f"Modality_{name}.json").write_text(json.dumps([{
            "question_id": name, "question": "q", "gt_answer": "A", "option_A": "A", "option_B": "B",
            "image_path": "x.png"}]))
    assert sorted(it.modality for it in read_omnimed(shards)) == sorted(OMNIMED_MODALITIES)
