"""What `medsight train` is handed: config files, data files and the --out folder. Bad input gets a ValueError
naming the file, field or item (the CLI prints it as one line), and a folder holding a run is never overwritten."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config import tiny_config
from medsight.model.loading import build_model
from medsight.prompt import render_messages, tokenize_prompt
from medsight.tokens import CODE_PATTERN, code_name
from medsight.train.cli import main as train_main
from medsight.train.data import ConversationDataset, SegmentationDataset, read_mask, read_rgb, training_messages
from medsight.train.loop import CONFIG_FILE, FINAL_DIR, LOG_FILE, read_log, train
from medsight.train.stages import Stage3Config
from medsight_testing.qwen import qwen3_tokenizer
from medsight_testing.train_data import write_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    ({"max_steps": -3}, r"field 'max_steps' is -3 \(number\); expected an integer >= 0"),
    ({"batch_size": 0}, r"field 'batch_size' is 0 \(number\); expected an integer >= 1"),
    ({"lr": "fast"}, r"field 'lr' is \"fast\" \(string\): Input should be a valid number"),
    ({"lr": float("nan")}, r"field 'lr' is NaN \(number\): Input should be a finite number"),
    ({"max_steps": 2.5}, r"field 'max_steps' is 2.5 \(number\): Input should be a valid integer"),
    ([1, 2], r"expected a JSON object of Stage3Config fields, got a list"),
    ({"betas": [0.9]}, r"field 'betas' is \[0.9\] \(list\): Field required \(item 1\)"),
    ({"max_step": 3}, r"unknown Stage3Config field\(s\): max_step \(did you mean max_steps\?\)"),
    ({"lr": 1e-7, "min_lr": 1e-6}, r"field 'min_lr' is 1e-06 \(number\); expected a number <= lr \(1e-07\)"),
])
def test_bad_config_values_are_named(tmp_path, content, message):
    path = _write(tmp_path / "cfg.json", content)
    with pytest.raises(ValueError, match=rf"cfg\.json: {message}"):
        Stage3Config.from_json(path)


def test_json_spellings_of_unambiguous_values_are_taken(tmp_path):
    path = _write(tmp_path / "cfg.json", {"lr": "1e-4", "max_steps": 1e3, "betas": [0.8, 0.9]})
    config = Stage3Config.from_json(path)
    assert (config.lr, config.max_steps, config.betas) == (1e-4, 1000, (0.8, 0.9))


def test_a_folder_as_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path} is a folder; expected the Stage3Config config file"):
        Stage3Config.from_json(tmp_path)


def test_unknown_init_from_lists_the_presets(data, tmp_path):
    config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": "tinyy"})
    with pytest.raises(ValueError, match=r"init_from 'tinyy': unknown preset or folder; use a preset \(demo, full, "
                                         r"tiny\)"):
        train_main(["stage3", "--config", str(config), "--data", str(data["lvlm"]), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_stage4_without_a_codebook_is_refused_before_the_model_is_loaded(data, tmp_path):
    """Stage 4 writes its code rows from the stage-2 codebook; a start model without one was refused only once built
    or loaded (minutes for the full model). The CLI reads the names in its weights file first: here a tensor of the
    wrong shape would make a load fail before any codebook check."""
    from safetensors.torch import load_file, save_file

    from medsight.model.loading import save_pretrained
    from medsight.train.stages import Stage4Config

    start = save_pretrained(build_model(tiny_config(), seed=0), tmp_path / "start")
    weights = start / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("mm_projector.0.weight"))
    save_file({**state, name: state[name][:1].contiguous()}, str(weights))
    out = tmp_path / "o"
    for init_from in (str(start), "tiny"):
        config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": init_from, "data_root": str(data["root"])})
        with pytest.raises(ValueError, match=rf"init_from {re.escape(repr(init_from))}: stage-4 embedding "
                                             r"initialisation needs the stage-2 codebook"):
            train_main(["stage4", "--config", str(config), "--data", str(data["lvlm"]), "--out", str(out)])
        assert not out.exists()
    from medsight.train.cli import check_codebook

    check_codebook(4, Stage4Config(init_from="demo"), out, resume=False)  # the embedded model has one
    check_codebook(4, Stage4Config(init_from="tiny", init_code_embeddings=False), out, resume=False)


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------
def _conversations(data: dict[str, Path], path: Path, items) -> ConversationDataset:
    # Items are checked when the dataset is built, before the tokenizer is used.
    return ConversationDataset(_write(path, items), None, 56, (0.5,) * 3, (0.5,) * 3, data_root=data["root"])


def test_conversation_item_without_image_is_named(data, tmp_path):
    with pytest.raises(ValueError, match=r"train\.json: item 0 \(id 'x'\): missing field\(s\) image"):
        _conversations(data, tmp_path / "train.json", [{"id": "x", "conversations": []}])


@pytest.mark.parametrize("markup", [True, False])
def test_a_conversation_without_an_answer_is_named_before_training(data, tmp_path, markup):
    """An item of questions only has nothing to supervise: with label_prompt_markup off its loss was NaN and the run
    stopped at that step as 'diverged (a learning rate too high)'; with the official rule it trained on the prompt's
    newlines and chat markers alone. Refused before --out is written, naming the item."""
    items = json.loads(data["lvlm"].read_text())
    index = next(i for i, item in enumerate(items) if not item["mask_orders"])
    items[index]["conversations"] = [t for t in items[index]["conversations"] if t["from"] == "human"]
    conversations = _write(tmp_path / "train.json", items)
    config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": "tiny", "data_root": str(data["root"]),
                                            "label_prompt_markup": markup})
    with pytest.raises(ValueError, match=rf"train\.json: item {index} \(id {items[index]['id']!r}\): the "
                                         r"conversation has no answer \(no gpt or assistant turn\) to train on"):
        train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_training_reads_each_turn_as_the_official_code(data, tmp_path):
    """The official training read removes each turn's <image>, strips its text and puts "<image>\\n" first, so the
    LLaVA-style "<image>\\nQuestion" is "<image>\\nQuestion" (Qwen3: the image, then 198 "\\n"); it rendered
    "<image>\\n\\nQuestion" (271 "\\n\\n"), and an answer's surrounding whitespace was trained as written."""
    tokenizer = qwen3_tokenizer()
    items = json.loads(data["lvlm"].read_text())
    question, answer = items[0]["conversations"]
    assert question["value"].startswith("<image>\n")  # the synthetic set is written LLaVA-style
    question_text = question["value"].removeprefix("<image>\n")
    answer_text = answer["value"]
    answer["value"] = f" {answer_text} \n"
    dataset = ConversationDataset(_write(tmp_path / "train.json", items[:1]), tokenizer, 56, (0.5,) * 3, (0.5,) * 3,
                                  data_root=data["root"])
    official = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "<image>",
                f"\n{question_text}<|im_end|>\n", f"<|im_start|>assistant\n{answer_text}<|im_end|>\n"]
    expected = [i for piece in official
                for i in ([-200] if piece == "<image>" else tokenizer(piece, add_special_tokens=False)["input_ids"])]
    ids = dataset[0].input_ids
    assert [int(i) for i in ids] == expected
    assert int(ids[expected.index(-200) + 1]) == tokenizer("\n", add_special_tokens=False)["input_ids"][0] == 198
    assert dataset.length(dataset.items[0]) == len(expected) - 1 + dataset.image_embeddings


def test_conversation_item_with_a_missing_image_file_is_named_before_training(data, tmp_path):
    items = json.loads(data["lvlm"].read_text())
    items[1]["image"] = "nope.png"
    with pytest.raises(ValueError, match=rf"train\.json: item 1 \(id {items[1]['id']!r}\): nope\.png not found"):
        _conversations(data, tmp_path / "train.json", items)



def test_conversation_item_whose_image_is_a_folder_is_named_before_training(data, tmp_path):
    items = json.loads(data["lvlm"].read_text())
    (tmp_path / "folder.png").mkdir()
    items[1]["image"] = str(tmp_path / "folder.png")
    with pytest.raises(ValueError, match=rf"train\.json: item 1 \(id {items[1]['id']!r}\): {tmp_path}/folder\.png is "
                                         r"a folder; expected the image"):
        _conversations(data, tmp_path / "train.json", items)

@pytest.mark.parametrize("stage", ["stage3", "stage4", "stage5"])
def test_a_region_code_the_model_lacks_is_named_before_training(data, tmp_path, stage):
    """`[M99_3]` (or `[M01_3]`) is no token of the model: it trained as plain text while its mask trained the state
    at position 0. Refused before --out is written, naming file, item, turn and code."""
    vocabulary = build_model(tiny_config(), seed=0).codes
    beyond = code_name(vocabulary.num_modalities, 0)  # one modality past the last
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    for code in (beyond, "[M01_3]"):
        items[coded]["conversations"][-1]["value"] = f"It is {code}."
        conversations = _write(tmp_path / "train.json", items)
        settings = {"max_steps": 1, "init_from": "tiny", "data_root": str(data["root"]), "grad_accum": 1}
        # The tiny preset has no stage-2 codebook to initialise stage 4's code rows from.
        config = _write(tmp_path / "cfg.json", {**settings, **({"init_code_embeddings": False} if stage == "stage4"
                                                                else {})})
        last = code_name(vocabulary.num_modalities - 1, vocabulary.codebook_size - 1)
        turn = len(items[coded]["conversations"]) - 1
        with pytest.raises(ValueError, match=rf"train\.json: item {coded} \(id {items[coded]['id']!r}\): "
                                             rf"conversations\[{turn}\] has region code {re.escape(code)}, which is "
                                             rf"not in the model's vocabulary \(\[M0_0\] to {re.escape(last)}\)"):
            train_main([stage, "--config", str(config), "--data", str(conversations), "--out", str(tmp_path / "o")])
        assert not (tmp_path / "o").exists()


def test_stage1_given_conversation_data_says_what_it_expects(data):
    with pytest.raises(ValueError, match=r"stages 1-2 expect a segmentation meta JSON object with roots, json_paths, "
                                         r"modality_labels; this file is a list \(conversation data is for stages "
                                         r"3-5\)"):
        SegmentationDataset(data["lvlm"], 56, (0.5,) * 3, (0.5,) * 3)


def _segmentation(data: dict[str, Path], tmp_path: Path, category_ids: list) -> SegmentationDataset:
    """The synthetic CT annotations with these category_id values (one per image), through a meta file here."""
    doc = json.loads((data["root"] / "ct.json").read_text())
    for ann, category in zip(doc["annotations"], category_ids, strict=False):
        ann["category_id"] = category
    meta = {"roots": [str(data["root"] / "ct" / "images")], "mask_roots": [str(data["root"] / "ct" / "masks")],
            "json_paths": [str(_write(tmp_path / "ct.json", doc))], "modality_labels": [0]}
    return SegmentationDataset(_write(tmp_path / "meta.json", meta), 56, (0.5,) * 3, (0.5,) * 3, num_classes=4)


def test_integral_category_ids_written_as_floats_or_strings_are_taken(data, tmp_path):
    # pandas exports write 3.0 or "3"; the class is the same.
    dataset = _segmentation(data, tmp_path, [3, 3.0, "2", " 1.0 "])
    assert [r.classes for r in dataset.records] == [[3], [3], [2], [1]]
    assert all(type(c) is int for r in dataset.records for c in r.classes)


@pytest.mark.parametrize("bad", [1.5, "one", "1.5", True, None, "nan", [1]])
def test_a_category_id_that_is_no_integer_is_named(data, tmp_path, bad):
    with pytest.raises(ValueError, match=rf"ct\.json: annotation 1: category_id {re.escape(json.dumps(bad))} is not "
                                         r"an integer"):
        _segmentation(data, tmp_path, [0, bad])


@pytest.mark.parametrize(("field", "what"), [("file_name", "image"), ("mask_file", "mask")])
def test_stage1_names_a_missing_image_or_mask_before_training(data, tmp_path, field, what):
    """Stages 1-2 check every annotation's files when the data is read, as stages 3-5 do: a missing one is named
    before any step (it stopped the run at the step that first read it, with checkpoints already written)."""
    doc = json.loads((data["root"] / "ct.json").read_text())
    last = len(doc["annotations"]) - 1
    doc["annotations"][last][field] = "gone.png"
    meta = {"roots": [str(data["root"] / "ct" / "images")], "mask_roots": [str(data["root"] / "ct" / "masks")],
            "json_paths": [str(_write(tmp_path / "ct.json", doc))], "modality_labels": [0]}
    config = _write(tmp_path / "cfg.json", {"init_from": "tiny", "max_steps": 1, "batch_size": 1})
    out = tmp_path / "run"
    folder = meta["roots" if what == "image" else "mask_roots"][0]
    with pytest.raises(ValueError, match=rf"ct\.json: annotation {last}: {what} not found: {folder}/gone\.png"):
        train_main(["stage1", "--config", str(config), "--data", str(_write(tmp_path / "meta.json", meta)),
                    "--out", str(out)])
    assert not out.exists()


def test_unreadable_training_images_and_masks_are_named(data, tmp_path):
    image = next((data["root"] / "ct" / "images").glob("*.png"))
    (tmp_path / "trunc.png").write_bytes(image.read_bytes()[:60])
    for read, path, message in [
        (read_rgb, tmp_path / "missing.png", rf"image not found: {tmp_path}/missing\.png"),
        (read_rgb, tmp_path, rf"{tmp_path} is a folder; expected the image"),
        (read_mask, tmp_path / "trunc.png", rf"cannot read the mask {tmp_path}/trunc\.png: "),
    ]:
        with pytest.raises(ValueError, match=message):
            read(path)
    assert read_rgb(image).shape == (56, 56, 3) and read_mask(image).shape == (56, 56)


def test_batches_of_items_with_different_code_counts_are_refused_before_training(data, tmp_path):
    """batch_size > 1 without pad_code_slots failed at the first step that drew items with different numbers of
    region codes, after --out held the run (whose resume then refused the changed pad_code_slots). Refused up front,
    naming two items that differ; with padded slots the same data trains."""
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    mask = items[coded]["mask_orders"][0]
    modality, index = map(int, CODE_PATTERN.search(items[coded]["conversations"][-1]["value"]).groups())
    names = [code_name(modality, index), code_name(modality, index + 1)]  # its own code and the next
    items[coded]["conversations"][-1]["value"] = f"It is {names[0]}, and also {names[1]}."
    items[coded]["mask_orders"] = [mask] * len(names)
    conversations = _write(tmp_path / "train.json", items)
    other = next(i for i in range(len(items)) if i != coded)
    first, second = sorted((coded, other))
    counts = {coded: len(names), other: max(1, len(items[other]["mask_orders"]))}  # no code decodes one slot
    assert counts[coded] != counts[other]
    out = tmp_path / "o"
    settings = {"max_steps": 1, "init_from": "tiny", "data_root": str(data["root"]), "grad_accum": 1, "batch_size": 2}
    config = _write(tmp_path / "cfg.json", settings)
    with pytest.raises(ValueError, match=rf"batch_size 2: every sample of a batch must decode the same number of "
                                         rf"region codes .* item {first} \(id {items[first]['id']!r}\) has "
                                         rf"{counts[first]} and .*item {second} \(id {items[second]['id']!r}\) has "
                                         rf"{counts[second]}; set pad_code_slots to true"):
        train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(out)])
    assert not out.exists()
    config = _write(tmp_path / "cfg.json", {**settings, "pad_code_slots": True})
    assert train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(out)]) == 0


def test_code_slots_count_the_code_tokens_the_losses_count(data, tmp_path):
    """`check_batches` counted codes with a regex over the text while `lvlm_losses` counts the model's code-token ids:
    they agreed only when the dataset was read with `codes` (which refuses unknown codes). The counts now come from
    the model's vocabulary, equal to the ids counted in every sample; read without it, a batch check is refused
    rather than made on a count the losses do not use."""
    model = build_model(tiny_config())
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    modality, index = map(int, CODE_PATTERN.search(items[coded]["conversations"][-1]["value"]).groups())
    items[coded]["conversations"][-1]["value"] += f" Also {code_name(modality, index + 1)}."
    items[coded]["mask_orders"] *= 2  # a mask for each code
    path = _write(tmp_path / "train.json", items)
    v = model.config.vision
    dataset = ConversationDataset(path, model.tokenizer, v.image_size, v.image_mean, v.image_std,
                                  data_root=data["root"], codes=model.codes)
    in_ids = [max(1, int(model.codes.is_code(torch.tensor(dataset[i].input_ids)).sum())) for i in range(len(items))]
    assert dataset.code_slots == in_ids and len(set(in_ids)) > 1
    unread = ConversationDataset(path, model.tokenizer, v.image_size, v.image_mean, v.image_std,
                                 data_root=data["root"])
    unread.check_batches(1, pad_code_slots=False)
    unread.check_batches(2, pad_code_slots=True)
    with pytest.raises(ValueError, match=rf"batch_size 2 without pad_code_slots: {re.escape(str(path))} was read "
                                         r"without the model's region codes"):
        unread.check_batches(2, pad_code_slots=False)


@pytest.mark.parametrize("extra", ["code", "mask"])
def test_region_codes_and_masks_of_other_counts_are_refused_before_training(data, tmp_path, extra):
    """The k-th code's state trains against the k-th mask of mask_orders: an answer naming one more code than the
    item has masks trained that code to no mask, one more mask was dropped, and every mask after a gap trained another
    code's state, all silently. Refused before --out is written, naming item and both counts."""
    vocabulary = build_model(tiny_config(), seed=0).codes
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    masks = len(items[coded]["mask_orders"])
    codes = sum(vocabulary.count_codes(t["value"]) for t in items[coded]["conversations"])
    assert codes == masks  # the fixture holds the rule
    if extra == "code":
        modality, index = map(int, CODE_PATTERN.search(items[coded]["conversations"][-1]["value"]).groups())
        items[coded]["conversations"][-1]["value"] += f" Also {code_name(modality, index + 1)}."
        codes += 1
    else:
        items[coded]["mask_orders"] *= 2
        masks *= 2
    conversations = _write(tmp_path / "train.json", items)
    config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": "tiny", "data_root": str(data["root"])})
    with pytest.raises(ValueError, match=rf"train\.json: item {coded} \(id {items[coded]['id']!r}\): its "
                                         rf"conversation names {codes} region code\(s\) but mask_orders lists "
                                         rf"{masks} mask\(s\)"):
        train_main(["stage5", "--config", str(config), "--data", str(conversations), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_the_codebook_rule_matches_the_model(tmp_path):
    """Train's stage-4 check reads only a weights file's names; the loader decides from the same names whether to
    attach the codebook: one rule (`holds_codebook`), true exactly for a model with the codebook attached."""
    from medsight.model.checkpoints import safetensors_names
    from medsight.model.loading import save_pretrained
    from medsight.model.medsight import holds_codebook

    model = build_model(tiny_config())
    plain = save_pretrained(model, tmp_path / "plain")
    model.attach_codebook()
    with_codebook = save_pretrained(model, tmp_path / "codebook")
    assert not holds_codebook(safetensors_names(plain)) and holds_codebook(safetensors_names(with_codebook))


def test_stage2_modality_labels_are_checked_before_training(data, tmp_path):
    """A modality label beyond the codebook's stopped stage 2 at the first step that met it (unnamed, after --out
    held the run); a word as a label was a bare int() error. Both are named with the meta file first."""
    meta = json.loads(data["meta"].read_text())
    rooted = {k: [str(data["root"] / p) for p in meta[k]] for k in ("roots", "mask_roots", "json_paths")}
    beyond = tiny_config().codebook.num_modalities  # the run starts from the tiny preset
    out = tmp_path / "o"
    config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": "tiny", "batch_size": 1})
    *kept, _ = meta["modality_labels"]  # the fixture's labels, the last one replaced
    for labels, message in (([*kept, beyond], rf"modality_labels \[{beyond}\] outside the codebook's {beyond} "
                                              rf"modalities \(0 to {beyond - 1}\)"),
                            ([*kept, "ct"], rf"modality_labels\[{len(kept)}\]: modality label \"ct\" is not an "
                                            r"integer")):
        path = _write(tmp_path / "meta.json", {**meta, **rooted, "modality_labels": labels})
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
            train_main(["stage2", "--config", str(config), "--data", str(path), "--out", str(out)])
        assert not out.exists()


def test_an_empty_data_set_is_named_and_leaves_no_run_in_out(data, tmp_path):
    """An empty conversation list (or annotation file) was refused only after --out held the run's config and log,
    so the command rerun on the corrected data was refused: "already holds a training run; pass --resume"."""
    meta = json.loads(data["meta"].read_text())
    empty_doc = _write(tmp_path / "none.json", {"annotations": []})
    empty_meta = {**meta, "json_paths": [str(empty_doc)] * len(meta["json_paths"]),
                  "roots": [str(data["root"] / r) for r in meta["roots"]],
                  "mask_roots": [str(data["root"] / r) for r in meta["mask_roots"]]}
    out = tmp_path / "o"
    for stage, path, named in (("stage3", _write(tmp_path / "train.json", []), "no conversation items"),
                               ("stage1", _write(tmp_path / "meta.json", empty_meta), "no annotations")):
        config = _write(tmp_path / "cfg.json", {"max_steps": 1, "init_from": "tiny"})
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {named}.*the training data set is empty"):
            train_main([stage, "--config", str(config), "--data", str(path), "--out", str(out)])
        assert not out.exists()
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match=r"the training data set is empty"):
        train(model, list(model.parameters()), [], list, lambda batch: {}, Stage3Config(max_steps=1), out)
    assert not out.exists()


def test_a_segmentation_image_or_mask_damaged_mid_run_names_its_annotation(tmp_path):
    """Read mid-run, a damaged mask named only its file; the error now names the annotation file and image_id too."""
    synthetic = write_synthetic(tmp_path / "data")
    dataset = SegmentationDataset(synthetic["meta"], 56, (0.5,) * 3, (0.5,) * 3)
    record = dataset.records[-1]
    mask = record.masks[0]
    mask.write_bytes(mask.read_bytes()[:60])
    doc = json.loads((synthetic["root"] / "us.json").read_text())
    image_id = next(a["image_id"] for a in doc["annotations"] if a["mask_file"] == mask.name)
    with pytest.raises(ValueError, match=rf"us\.json: image_id {image_id}: cannot read the mask {mask}: "):
        dataset[len(dataset) - 1]


# ---------------------------------------------------------------------------------------------------------------
# The --out folder
# ---------------------------------------------------------------------------------------------------------------
def _train(data, out: Path, config: dict, tmp_path: Path, *extra: str) -> None:
    path = _write(tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.json", {"init_from": "tiny", **config})
    assert train_main(["stage3", "--config", str(path), "--data", str(data["lvlm"]), "--out", str(out), *extra]) == 0


def test_a_run_is_never_overwritten_and_a_resume_must_match_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    run = {"max_steps": 2, "save_every": 1, "grad_accum": 1}
    _train(data, out, run, tmp_path)
    log, weights, saved = (out / LOG_FILE).read_text(), (out / FINAL_DIR / "model.safetensors").read_bytes(), \
        (out / CONFIG_FILE).read_text()

    # A new run into the same folder, without --resume: refused, nothing touched.
    with pytest.raises(ValueError, match=rf"{out} already holds a training run \(train_config\.json, "
                                         r"loss_log\.jsonl, checkpoints, final\); pass --resume to continue it, or "
                                         r"choose another --out folder"):
        _train(data, out, {"max_steps": 1, "lr": 1e-3}, tmp_path)
    # --resume with a config that changes what a step computes: refused, naming the field.
    with pytest.raises(ValueError, match=r"cannot resume the run in .*: the config differs from its "
                                         r"train_config\.json \(lr: 2e-05 in the run, 0\.001 now\)"):
        _train(data, out, {**run, "lr": 1e-3}, tmp_path, "--resume")
    assert (out / LOG_FILE).read_text() == log and (out / CONFIG_FILE).read_text() == saved
    assert (out / FINAL_DIR / "model.safetensors").read_bytes() == weights

    # Resuming the finished run trains nothing and says so, with the loss its log holds for the last step.
    capsys.readouterr()
    _train(data, out, run, tmp_path, "--resume")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["new_steps"] == 0
    assert printed["last_loss"] == read_log(out)[-1]["loss"] is not None
    # An allowed change: more steps (and another save interval) continue the run.
    _train(data, out, {**run, "max_steps": 3, "save_every": 2}, tmp_path, "--resume")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    # A resume cannot shorten a run.
    with pytest.raises(ValueError, match=r"step-0000003 \(step 3\) with 1 steps in all: a resume can lengthen a run, "
                                         r"not shorten it"):
        _train(data, out, {**run, "max_steps": 1}, tmp_path, "--resume")


def test_out_that_is_a_file_is_refused(data, tmp_path):
    target = _write(tmp_path / "notes.json", {"keep": "me"})
    with pytest.raises(ValueError, match=rf"--out {target} is a file; the output must be a folder"):
        _train(data, target, {"max_steps": 1}, tmp_path)
    assert json.loads(target.read_text()) == {"keep": "me"}


def test_conversations_longer_than_the_model_takes_are_refused_before_training(data, tmp_path):
    """An item longer than the language model's limit (in embeddings, the image's included) was refused by the model
    only at the step that drew it, hours in, naming neither item nor step and saving nothing since the last
    checkpoint (the official code cut it at the limit, answer included). Refused up front, naming count, item and
    length; an item exactly at the limit trains."""
    model = build_model(tiny_config())
    limit, image = model.config.llm.max_sequence_length, model.config.image_embeddings
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    answer = items[coded]["conversations"][-1]

    def length() -> int:
        return len(tokenize_prompt(model.tokenizer, training_messages(items[coded]["conversations"]))) - 1 + image

    answer["value"] += " " + "x" * (limit - length() - 1)  # the byte tokenizer: one id per byte
    assert length() == limit
    settings = {"max_steps": 1, "init_from": "tiny", "data_root": str(data["root"]), "grad_accum": 1}
    config = _write(tmp_path / "cfg.json", settings)
    alone = _write(tmp_path / "alone.json", [items[coded]])  # the model takes it: the length is counted right
    assert train_main(["stage3", "--config", str(config), "--data", str(alone), "--out", str(tmp_path / "a")]) == 0
    answer["value"] += "x"
    conversations = _write(tmp_path / "train.json", items)
    with pytest.raises(ValueError, match=rf"1 item\(s\) of {re.escape(str(conversations))} are longer than the "
                                         rf"model's {limit} embeddings \(conversation and image, {image} of them the "
                                         rf"image's\), first .*train\.json: item {coded} "
                                         rf"\(id {items[coded]['id']!r}\): {limit + 1}; shorten or remove them"):
        train_main(["stage3", "--config", str(config), "--data", str(conversations), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_the_byte_count_that_spares_tokenising_holds_for_qwen3_normalised_text(data, tmp_path):
    """Only items of more UTF-8 bytes than the limit leaves room for were tokenised, as if a token were at least one
    byte of the text; Qwen3's tokenizer first applies NFC, which turns some characters (U+1D1C0, 4 bytes) into 3 of
    6 tokens, so a conversation longer than the limit in tokens but not in bytes went unchecked up front."""
    tokenizer = qwen3_tokenizer()
    items = json.loads(data["lvlm"].read_text())[:1]
    items[0]["conversations"][-1]["value"] = "\U0001D1C0" * 300
    path = _write(tmp_path / "train.json", items)
    dataset = ConversationDataset(path, tokenizer, 56, (0.5,) * 3, (0.5,) * 3, data_root=data["root"])
    limit = sum(len(text.encode()) for text in render_messages(training_messages(items[0]["conversations"])))
    length = dataset.length(dataset.items[0])
    assert length > limit  # more tokens than bytes
    with pytest.raises(ValueError, match=rf"1 item\(s\) of .* are longer than the model's {limit} embeddings .*"
                                         rf"item 0 \(id {items[0]['id']!r}\): {length}; shorten or remove them"):
        ConversationDataset(path, tokenizer, 56, (0.5,) * 3, (0.5,) * 3, data_root=data["root"], max_length=limit)


def test_a_sample_longer_than_the_model_takes_is_named_when_read(data):
    """The up-front check tokenises only items whose bytes could pass the limit (byte-level BPE); each sample made is
    checked too, so a tokenizer outside that rule stops the run at the read, named, with the state saved."""
    model = build_model(tiny_config())
    v = model.config.vision
    dataset = ConversationDataset(data["lvlm"], model.tokenizer, v.image_size, v.image_mean, v.image_std,
                                  data_root=data["root"], codes=model.codes,
                                  max_length=model.config.llm.max_sequence_length,
                                  image_embeddings=model.config.image_embeddings)
    length = dataset.length(dataset.items[0])
    assert len(dataset[0].input_ids) - 1 + model.config.image_embeddings == length
    dataset.max_length = length - 1
    with pytest.raises(ValueError, match=rf"train\.json: item 0 \(id {dataset.items[0]['id']!r}\): {length} "
                                         rf"embeddings long, more than the model's {length - 1}"):
        dataset[0]


@pytest.mark.parametrize(("dtype", "inside", "palette"), [(np.uint8, 1, False), (np.uint16, 1, False),
                                                          (np.uint8, 1, True)])
def test_a_mask_with_nothing_above_half_scale_is_refused_rather_than_read_empty(tmp_path, dtype, inside, palette):
    """The official rule (grey level > half scale) reads a 0/1 label image, 8- or 16-bit, or a palette mask of a dark
    colour as an empty mask: stage 1 trained a query towards it, the LVLM loss dropped it, silently (old code: 0 of
    the square's pixels set). Refused naming file and grey level; a 0/255 mask reads whole."""
    square = np.zeros((32, 32), dtype)
    square[8:24, 8:24] = inside
    path = tmp_path / "mask.png"
    image = Image.fromarray(square)
    if palette:
        image = image.convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0])  # index 1 is red: grey level 76
    image.save(path)
    grey = np.asarray(Image.open(path).convert("L")).max()
    with pytest.raises(ValueError, match=rf"the mask {path} has pixels set but none above half scale \(its largest "
                                         rf"grey level is {grey} of 255\)"):
        read_mask(path)
    Image.fromarray((square > 0).astype(np.uint8) * 255).save(path)
    assert int(read_mask(path).sum()) == int((square > 0).sum())


def test_a_mask_of_another_aspect_ratio_than_its_image_is_named_when_read(tmp_path):
    """A mask of another aspect ratio than its image cannot be that image's: stage 1 stretched its prediction onto
    it and the LVLM loss its resized copy, silently. The read names item (or annotation), mask, image and sizes (a
    run stops there with its state saved); a mask of another size but the same aspect ratio still reads."""
    data = write_synthetic(tmp_path / "data")
    model = build_model(tiny_config())
    v = model.config.vision
    conversations = ConversationDataset(data["lvlm"], model.tokenizer, v.image_size, v.image_mean, v.image_std,
                                        codes=model.codes)
    segmentation = SegmentationDataset(data["meta"], v.image_size, v.image_mean, v.image_std)
    coded = next(i for i, item in enumerate(conversations.items) if item["mask_orders"])
    item = conversations.items[coded]
    mask = conversations.resolve(item["mask_files"][item["mask_orders"][0]])
    image = conversations.resolve(item["image"])
    record = next(i for i, r in enumerate(segmentation.records) if r.masks == [mask])
    height, width = read_rgb(image).shape[:2]
    full = read_mask(mask).numpy().astype(np.uint8) * 255
    Image.fromarray(full[::2, ::2]).save(mask)  # half the size, the same aspect ratio
    assert tuple(conversations[coded].masks.shape[-2:]) == tuple(segmentation[record].masks.shape[-2:]) == (
        (height + 1) // 2, (width + 1) // 2)
    Image.fromarray(full[:, : width // 2]).save(mask)
    sizes = rf"the mask {mask} is {width // 2}x{height} pixels, the image {image} {width}x{height}: another aspect"
    with pytest.raises(ValueError, match=rf"train\.json: item {coded} \(id {item['id']!r}\): {sizes}"):
        conversations[coded]
    with pytest.raises(ValueError, match=rf"\.json: image_id \d+: {sizes}"):
        segmentation[record]


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_a_mask_or_image_file_that_is_no_name_is_named(data, tmp_path, bad):
    """A mask file given as null or a number stopped the data's read with pathlib's TypeError, naming neither item nor
    mask (an empty one as 'the data folder is a folder; expected the mask'). Named with the field and value."""
    items = json.loads(data["lvlm"].read_text())
    coded = next(i for i, item in enumerate(items) if item["mask_orders"])
    mask = items[coded]["mask_orders"][0]
    items[coded]["mask_files"][mask] = bad
    with pytest.raises(ValueError, match=rf"train\.json: item {coded} \(id {items[coded]['id']!r}\): "
                                         rf"mask_files\['{mask}'\] must be a file path, got "
                                         rf"{re.escape(json.dumps(bad))}"):
        _conversations(data, tmp_path / "train.json", items)
    meta = json.loads(data["meta"].read_text())
    copy = tmp_path / "seg"
    shutil.copytree(data["root"], copy, ignore=shutil.ignore_patterns("lvlm"))
    annotations = copy / meta["json_paths"][0]
    doc = json.loads(annotations.read_text())
    for field in ("file_name", "mask_file"):
        edited = json.loads(json.dumps(doc))
        edited["annotations"][1][field] = bad
        annotations.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=rf"{re.escape(str(annotations))}: annotation 1: {field} must be a file "
                                             rf"name, got {re.escape(json.dumps(bad))}"):
            SegmentationDataset(copy / data["meta"].name, 56, (0.5,) * 3, (0.5,) * 3)


def test_an_image_id_naming_two_images_is_refused(data, tmp_path):
    """Stages 1-2 group masks by image_id: an annotation whose image_id an earlier one of another image used had its
    mask trained on that image, and its own image dropped (the fixture's 8 images read as 7, one with 2 masks),
    silently. Refused naming the annotation file and both images."""
    meta = json.loads(data["meta"].read_text())
    copy = tmp_path / "seg"
    shutil.copytree(data["root"], copy, ignore=shutil.ignore_patterns("lvlm"))
    annotations = copy / meta["json_paths"][0]
    doc = json.loads(annotations.read_text())
    first, second = doc["annotations"][:2]
    assert first["file_name"] != second["file_name"]
    second["image_id"] = first["image_id"]
    annotations.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{re.escape(str(annotations))}: annotation 1: image_id "
                                         rf"{json.dumps(first['image_id'])} is {second['file_name']}, but an earlier "
                                         rf"annotation of that image_id is {first['file_name']}"):
        SegmentationDataset(copy / data["meta"].name, 56, (0.5,) * 3, (0.5,) * 3)
