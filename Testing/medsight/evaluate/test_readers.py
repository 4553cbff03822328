"""Readers of the official files on small hand-written examples, including their error messages."""

import json
import re
from pathlib import Path

import pytest

from medsight.evaluate.readers import MC_SUFFIX, DataError, read_diagseg, read_llava_vqa, read_omnimed


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_diagseg_seg_and_vqa(tmp_path):
    seg = _write(tmp_path / "seg.json", [{
        "qa_id": 7, "question": "What is it? Segment it.", "answer": "A tumor <mask>.", "short_answer": "Benign tumor",
        "image_file": "/abs/img.png", "mask_ids": [3, 54], "masks": [[3, "a.png"], [54, "b.png"], [54, ["c.png"]]],
        "answer_type": "open", "modality": "Dermatoscopy",
    }])
    (item,) = read_diagseg(seg)
    assert item.id == "7" and item.answer == "Benign tumor" and item.modality == "Dermoscopy"
    assert str(item.image) == "/abs/img.png"
    # Only the last mask id's files, and of two entries of that id the last, as the notebooks' dict of id to file.
    assert [p.name for p in item.masks] == ["c.png"]
    assert item.masks[0].parent == tmp_path
    vqa = _write(tmp_path / "vqa.json", [{"qa_id": "q1", "question": "<image>\nWhat?", "answer": "long",
                                           "image_file": "i.png", "modality": "CT"}])
    (v,) = read_diagseg(vqa, image_root="/data")
    assert v.answer == "long" and v.question == "What?" and str(v.image) == "/data/i.png" and v.masks == []


def test_diagseg_errors(tmp_path):
    bad = _write(tmp_path / "bad.json", [{"qa_id": "x", "question": "q", "short_answer": "a"}])
    with pytest.raises(DataError, match=r"bad\.json: item 0 \(id 'x'\): missing field 'image_file'"):
        read_diagseg(bad)
    no_mask = _write(tmp_path / "nm.json", [{"qa_id": "y", "question": "q", "short_answer": "a", "image_file": "i",
                                             "mask_ids": [2], "masks": [[1, "m.png"]]}])
    with pytest.raises(DataError, match="no entry of 'masks' has the last mask id '2'"):
        read_diagseg(no_mask)
    dup = _write(tmp_path / "dup.json", [{"qa_id": 1, "question": "q", "answer": "a", "image_file": "i"}] * 2)
    with pytest.raises(DataError, match="duplicate id '1'"):
        read_diagseg(dup)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        read_diagseg(tmp_path / "broken.json")
    _write(tmp_path / "obj.json", {"a": 1})
    with pytest.raises(DataError, match="expected a JSON list"):
        read_diagseg(tmp_path / "obj.json")


def test_llava_vqa(tmp_path):
    path = _write(tmp_path / "test.json", [
        {"id": 1, "image": "synpic1.jpg", "answer_type": "CLOSED",
         "conversations": [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "yes"}]},
        {"id": 2, "image": "synpic2.jpg", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "Which organ?"}, {"from": "gpt", "value": "Liver"}]},
    ])
    a, b = read_llava_vqa(path)
    assert (a.answer_type, a.question, a.answer) == ("closed", "Is it normal?", "yes")
    assert b.answer_type == "open" and b.image == tmp_path / "synpic2.jpg"
    bad = _write(tmp_path / "b.json", [{"id": 3, "image": "x", "answer_type": "OPEN",
                                        "conversations": [{"from": "human", "value": "q"}]}])
    with pytest.raises(DataError, match=r"item 0 \(id 3\): missing field 'conversations.1.value'"):
        read_llava_vqa(bad)


def test_omnimed(tmp_path):
    item = {"question_id": "ct_1", "question": "Which organ", "gt_answer": "Liver", "option_A": "Liver",
            "option_B": "Lung", "option_C": "Brain", "image_path": "img/1.png"}
    _write(tmp_path / "Modality_CT.json", [item])
    _write(tmp_path / "Modality_MRI.json", [{**item, "question_id": "mr_1", "option_C": None}])
    ct, mr = read_omnimed(tmp_path)
    assert ct.modality == "CT" and ct.options == ["Liver", "Lung", "Brain"] and ct.question == "Which organ" + MC_SUFFIX
    assert mr.modality == "MRI" and mr.options == ["Liver", "Lung"] and ct.answer_type == "mc"
    bad = _write(tmp_path / "x" / "Modality_US.json" if (tmp_path / "x").mkdir() is None else None,
                 [{"question_id": "u", "question": "q", "gt_answer": "a", "option_A": "a", "image_path": "p"}])
    with pytest.raises(DataError, match=r"Modality_US.json: item 0 \(id 'u'\): missing field 'option_B'"):
        read_omnimed(bad)


def test_an_id_repeated_in_two_omnimed_files_names_both(tmp_path):
    """The folder's items were checked as one list: the error named the folder and an index into the merged list
    ("item 2"), which is in no file."""
    item = {"question": "Which organ", "gt_answer": "Liver", "option_A": "Liver", "option_B": "Lung",
            "image_path": "1.png"}
    _write(tmp_path / "Modality_CT.json", [{**item, "question_id": 1}, {**item, "question_id": 2}])
    _write(tmp_path / "Modality_MR.json", [{**item, "question_id": 3}, {**item, "question_id": 1}])
    with pytest.raises(DataError, match=r"Modality_MR\.json: item 1: duplicate id '1', also in Modality_CT\.json "
                                        r"\(ids must be unique across the folder's files"):
        read_omnimed(tmp_path)


def test_several_reference_answers_are_refused_not_scored_as_their_repr(tmp_path):
    """A list of reference answers was read as the string "['Benign tumor', 'tumor']" and scored 0 against
    'benign tumor' (recall 0) without a word; the official scripts score one answer string per item."""
    answers = ["Benign tumor", "tumor"]
    cases = [
        (read_diagseg, "short_answer", {"qa_id": "d1", "question": "q", "short_answer": answers, "image_file": "i"}),
        (read_llava_vqa, "conversations.1.value", {"id": "v1", "image": "i", "answer_type": "OPEN", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": answers}]}),
        (read_omnimed, "gt_answer", {"question_id": "m1", "question": "q", "gt_answer": answers, "image_path": "i",
                                     "option_A": answers[0], "option_B": answers[1]}),
    ]
    for reader, field, raw in cases:
        ident = next(raw[k] for k in ("qa_id", "id", "question_id") if k in raw)
        with pytest.raises(DataError, match=rf"item 0 \(id '{ident}'\): field '{field}' is a list, not one answer "
                                            r"string \(the official evaluation scores one reference answer"):
            reader(_write(tmp_path / f"Modality_{ident}.json", [raw]))
        number = _write(tmp_path / f"Modality_n{ident}.json", [{**raw, **_with_answer(field, raw, 2)}])
        assert reader(number)[0].answer == "2"  # a number stays one answer, as before


def _with_answer(field, raw, value):
    if field == "conversations.1.value":
        return {"conversations": [raw["conversations"][0], {"from": "gpt", "value": value}]}
    return {field: value}


SEG_ITEM = {"qa_id": "s1", "question": "<image>\nWhere is the lesion?", "short_answer": "liver lesion",
            "image_file": "i.png", "answer_type": "open", "modality": "CT", "mask_ids": [0], "masks": [[0, "m.png"]]}


@pytest.mark.parametrize("change, problem", [
    # Lists and numbers became their repr: a question "['a']", an image path ".../5", a mask ".../None".
    ({"question": ["Where?"]}, "field 'question' is a list, not a string"),
    ({"question": "<image>\n"}, "field 'question' holds no question besides its <image> tag"),
    ({"question": ""}, "field 'question' is empty"),
    ({"image_file": 5}, "field 'image_file' is a number, not a string"),
    ({"image_file": ""}, "field 'image_file' is empty"),
    ({"answer_type": ["open"]}, "field 'answer_type' is a list, not a string"),
    ({"modality": {"name": "CT"}}, "field 'modality' is an object, not a string"),
    ({"qa_id": ["s1"]}, "field 'qa_id' is a list, not a string or number"),
    ({"masks": [[0, None]]}, r"the files of 'masks' entry \[0, None\] must be PNG paths"),
    ({"masks": [[0, ["m.png", 3]]]}, r"the files of 'masks' entry \[0, \['m.png', 3\]\] must be PNG paths"),
])
def test_malformed_items_are_named_before_any_answer(tmp_path, change, problem):
    good = {**SEG_ITEM, "qa_id": "s0"}
    path = _write(tmp_path / "seg.json", [good, {**SEG_ITEM, **change}])
    ident = re.escape(repr(change.get("qa_id", SEG_ITEM["qa_id"])))
    with pytest.raises(DataError, match=rf"seg\.json: item 1 \(id {ident}\): {problem}"):
        read_diagseg(path)


def test_a_diagseg_answer_type_is_kept_as_given_and_blank_optional_fields_are_read(tmp_path):
    """A blank or missing answer type was read as "open" (scored as open, where run_eval.py skips "" and fails on a
    missing one), and an "mc" item's options were read to score it as OmniMedVQA's (run_eval.py skips it): each is
    kept as given now, for the report to skip and name (`metrics.text_kind`)."""
    no_type = {k: v for k, v in SEG_ITEM.items() if k != "answer_type"}
    raws = [{**SEG_ITEM, "qa_id": "mc", "answer_type": "MC", "option_A": "liver lesion", "option_B": "kidney cyst",
             "modality": ""}, {**SEG_ITEM, "qa_id": "blank", "answer_type": " "}, {**no_type, "qa_id": "missing"},
            {**SEG_ITEM, "qa_id": "open", "answer_type": "OPEN"}]
    items = read_diagseg(_write(tmp_path / "seg.json", raws))
    assert [(it.answer_type, it.options) for it in items] == [("mc", []), ("", []), ("", []), ("open", [])]
    assert items[0].modality == "unknown" and items[0].question == "Where is the lesion?"


@pytest.mark.parametrize("reader", [read_diagseg, read_llava_vqa, read_omnimed])
def test_a_file_without_items_is_refused(tmp_path, reader):
    """An empty file gave a report of 0 items, 0 scored, 0 missing and exit status 0, as if it were a result."""
    for name, text in [("Modality_A.json", "[]"), ("b.jsonl", "\n\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}: holds no items"):
            reader(tmp_path / name)


def test_data_files_written_on_windows_are_read_as_written_elsewhere(tmp_path):
    """A byte-order mark (Notepad, PowerShell's Out-File -Encoding utf8) made a data file 'not valid JSON (Unexpected
    UTF-8 BOM)'; with CRLF line ends too, a .jsonl file's first line. Now both read as the plain file does."""
    raw = [{"id": i, "image": "i.png", "answer_type": kind, "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "yes"}]}
        for i, kind in enumerate(["CLOSED", "OPEN"])]
    plain = read_llava_vqa(_write(tmp_path / "plain.json", raw))
    for name, text in [("bom.json", json.dumps(raw)),
                       ("bom.jsonl", "\r\n".join(json.dumps(r) for r in raw) + "\r\n")]:
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert read_llava_vqa(tmp_path / name) == plain


def test_an_empty_json_data_file_is_called_empty(tmp_path):
    """An empty .json file (a failed download, a copy cut short) was 'not valid JSON (Expecting value: line 1
    column 1 (char 0))'."""
    (tmp_path / "empty.json").write_text(" \r\n\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'empty.json'))}: the data file is empty$"):
        read_llava_vqa(tmp_path / "empty.json")


def test_a_last_mask_id_that_is_a_list_takes_the_union_of_its_masks(tmp_path):
    """The notebooks take a last 'mask_ids' entry that is a list of ids as the union of those masks
    ([[mask_files_dict[m] for m in mask]]); the reader refused it: "no entry of 'masks' has the last mask id
    '[0, 1]'"."""
    item = {"qa_id": "q", "question": "Segment the lesions.", "short_answer": "two lesions", "image_file": "i.png",
            "mask_ids": [5, [0, 1]], "masks": [[0, "a.png"], [1, "b.png"], [5, "c.png"]]}
    (read,) = read_diagseg(_write(tmp_path / "seg.json", [item]))
    assert read.masks == [tmp_path / "a.png", tmp_path / "b.png"]
    for last, problem in [([0, 7], r"no entry of 'masks' has the last mask id '7' \(of the last 'mask_ids' entry "
                                   r"\[0, 7\]\)"),
                          ([], r"the last 'mask_ids' entry is an empty list")]:
        with pytest.raises(DataError, match=problem):
            read_diagseg(_write(tmp_path / "bad.json", [{**item, "mask_ids": [5, last]}]))


def _link_tree(root):
    """Folders and files reached through links, "..", "." and missing parts: each must resolve as Path.resolve."""
    (root / "data" / "imgs" / "sub").mkdir(parents=True)
    (root / "elsewhere").mkdir()
    for f in ("data/imgs/a.png", "data/imgs/sub/b.png", "elsewhere/t.png", "data/top.png"):
        (root / f).touch()
    (root / "data" / "linked").symlink_to(root / "elsewhere")  # a folder that is a link
    (root / "data" / "imgs" / "c.png").symlink_to(root / "elsewhere" / "t.png")  # a file that is a link
    (root / "data" / "imgs" / "rel.png").symlink_to("../top.png")  # a relative link
    (root / "data" / "imgs" / "dangling.png").symlink_to(root / "gone.png")
    return ["imgs/a.png", "imgs/sub/b.png", "imgs/./a.png", "imgs//sub/b.png", "imgs/sub/../a.png", "imgs/sub/..",
            "linked/t.png", "imgs/c.png", "imgs/rel.png", "imgs/dangling.png", "imgs/missing.png",
            "nofolder/x/../y.png", "../elsewhere/t.png", ".", "..", "imgs", "linked/../imgs/a.png",
            str(root / "data" / "imgs" / "c.png")]


@pytest.mark.parametrize("relative_root", [False, True])
def test_image_paths_resolve_as_path_resolve(tmp_path, monkeypatch, relative_root):
    # Each folder is resolved once per file read: the paths found are those a full Path.resolve of each item finds.
    values = _link_tree(tmp_path)
    root = tmp_path / "data"
    if relative_root:  # --image-root given relative to the working folder
        monkeypatch.chdir(tmp_path)
        root = root.relative_to(tmp_path)
    vqa = _write(tmp_path / "vqa.json", [
        {"id": str(i), "image": v, "answer_type": "open", "conversations": [{"value": "q"}, {"value": "a"}]}
        for i, v in enumerate(values)])
    expected = [Path(v) if Path(v).is_absolute() else (root / v).resolve() for v in values]
    assert [it.image for it in read_llava_vqa(vqa, image_root=root)] == expected
    masks = _write(tmp_path / "seg.json", [{"qa_id": "s", "question": "q", "short_answer": "a", "image_file": "x",
                                           "mask_ids": [1], "masks": [[1, values]]}])
    assert read_diagseg(masks, image_root=root)[0].masks == expected


def test_a_missing_absolute_path_outside_the_named_image_root_is_refused_an_existing_one_read(tmp_path):
    """With --images given, an absolute image or mask path outside it that names no file (a data file written on
    another machine) was kept and failed later, advising the --images already given; one that exists is read as
    written (a file mixing relative images with absolute masks elsewhere, as the official code reads it)."""
    root, outside = tmp_path / "data", "/elsewhere/x.png"
    inside = str(root / "imgs" / "x.png")
    present = tmp_path / "masks" / "x.png"  # outside --images, and there
    present.parent.mkdir()
    present.write_bytes(b"")
    files = {
        read_diagseg: lambda image, mask: {"qa_id": "d", "question": "q", "short_answer": "a", "image_file": image,
                                           "mask_ids": [1], "masks": [[1, mask]]},
        read_llava_vqa: lambda image, _: {"id": "v", "image": image, "answer_type": "open",
                                          "conversations": [{"value": "q"}, {"value": "a"}]},
        read_omnimed: lambda image, _: {"question_id": "m", "question": "q", "gt_answer": "A", "option_A": "A",
                                        "option_B": "B", "image_path": image},
    }
    for reader, item in files.items():
        cases = [(outside, inside), *([(inside, outside)] if reader is read_diagseg else [])]
        for image, mask in cases:
            data = _write(tmp_path / "Modality_CT.json", [item(image, mask)])
            with pytest.raises(DataError, match=rf"Modality_CT\.json: item 0 \(id '.'\): {outside} does not exist: "
                                                rf"an absolute path is used as written, and --images {root} applies"):
                reader(data, image_root=root)
            (found,) = reader(data)  # no --images: absolute paths are used as written
            assert str(found.image) == image
            there = [str(present) if path == outside else path for path in (image, mask)]
            (found,) = reader(_write(tmp_path / "Modality_CT.json", [item(*there)]), image_root=root)
            assert str(found.image) == there[0] and [str(m) for m in found.masks] == there[1:] * bool(found.masks)
        data = _write(tmp_path / "Modality_CT.json", [item(inside, inside)])
        (found,) = reader(data, image_root=root)
        assert str(found.image) == inside and [str(m) for m in found.masks] == ([inside] if found.masks else [])
