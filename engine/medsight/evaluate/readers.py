"""Readers for the official evaluation files, validated item by item with errors naming the file and the item.

A data file is one JSON list of items, or JSON Lines (one item per line) when its name ends in ``.jsonl``.
Every reader returns `EvalItem`s. Relative image and mask paths are joined to ``image_root`` (default: the data
file's folder); absolute ones are kept, as the official ``os.path.join(image_folder, abs)`` does, but with an
``image_root`` given (--images) only inside it: one outside would ignore the option silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medsight.evaluate.metrics import OPTION_KEYS, canonical_modality, one_spelling_each, options_of
from medsight.user_files import read_user_text

#: OmniMedVQA prompt suffix (the options are NOT shown to the model, as officially).
MC_SUFFIX = ". Answer this question shortly by only selecting one option."
_IMAGE_TAG = re.compile(r"<image>\s*")


class DataError(ValueError):
    """A data file or one of its items is malformed."""


@dataclass
class EvalItem:
    """One question to ask and what to score it against.

    Attributes:
        id: question id (unique in its file).
        question: the prompt text (without any ``<image>`` tag; the engine places the image).
        answer: the GT string scored by the text metrics.
        answer_type: the data's answer type, lower-cased: "open", one starting with "close", or "mc" with options
            (OmniMedVQA's); any other ("" for a DiagSeg item without one, a VQA or DiagSeg "mc") is scored by no
            text metric, as in `run_eval.py`; the report skips such items and names their types.
        image: absolute image path.
        modality: canonical modality name ("unknown" if the file has none).
        options: multiple-choice options (A..D order), else empty.
        masks: GT mask PNGs whose union is the Dice target (segmentation items), else empty.
    """

    id: str
    question: str
    answer: str
    answer_type: str
    image: Path
    modality: str = "unknown"
    options: list[str] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)


def _load_list(path: Path) -> list:
    """The items of a data file: one JSON list, or JSON Lines (one item per line) when the name ends in .jsonl
    (the LLaVA-Med question files are JSON Lines). Told apart by the suffix so an error names the right format."""
    text = read_user_text(path, "data file", DataError)
    if path.suffix.lower() == ".jsonl":
        return _json_lines(path, text)
    if not text.strip():  # JSON's own words for it are "Expecting value: line 1 column 1 (char 0)"
        raise DataError(f"{path}: the data file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); the file must be one JSON list of items "
                        "(JSON Lines, one item per line, are read from files named *.jsonl)") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _json_lines(path: Path, text: str) -> list:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err}); a .jsonl file holds one item per "
                            "line") from None
    return items


def _where(path: Path, index: int, item) -> str:
    ident = None
    if isinstance(item, Mapping):
        ident = next((item[k] for k in ("qa_id", "question_id", "id") if k in item), None)
    return f"{path}: item {index}" + (f" (id {ident!r})" if ident is not None else "")


def _field(path: Path, index: int, item, dotted: str):
    """Resolve a dotted field path ("conversations.1.value") or raise naming the file, item and field."""
    if not isinstance(item, Mapping):
        raise DataError(f"{_where(path, index, item)}: expected an object, got {type(item).__name__}")
    node = item
    for part in dotted.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise DataError(f"{_where(path, index, item)}: missing field {dotted!r}") from None
    if node is None:
        raise DataError(f"{_where(path, index, item)}: field {dotted!r} is null")
    return node


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _text(path: Path, index: int, item, dotted: str, numbers: bool = False) -> str:
    """A text field (a number too where `numbers`: ids); a list or object would otherwise become its repr and be
    asked, opened or grouped by as such, and an empty string would ask nothing or name the data's folder."""
    value = _field(path, index, item, dotted)
    if not isinstance(value, str) and not (numbers and isinstance(value, int | float) and not isinstance(value, bool)):
        kind = _JSON_KINDS.get(type(value), f"a {type(value).__name__}")
        raise DataError(f"{_where(path, index, item)}: field {dotted!r} is {kind}, not "
                        f"{'a string or number' if numbers else 'a string'}")
    if not str(value).strip():
        raise DataError(f"{_where(path, index, item)}: field {dotted!r} is empty")
    return str(value)


def _optional_text(path: Path, index: int, item, key: str) -> str | None:
    """A field that may be absent, null or blank (modality, answer type: the default applies), else text."""
    value = item.get(key)
    return None if value is None or (isinstance(value, str) and not value.strip()) else _text(path, index, item, key)


def _answer(path: Path, index: int, item, value, dotted: str) -> str:
    """The item's one reference answer as text; a list or object (several references) is refused, since the
    official scripts score one string and str() of it would be scored silently as '['yes', 'no']'."""
    if isinstance(value, list | dict | bool):
        raise DataError(f"{_where(path, index, item)}: field {dotted!r} is a {type(value).__name__}, not one answer "
                        "string (the official evaluation scores one reference answer per item)")
    return str(value)


class _Resolver:
    """Resolves a data file's relative paths against ``root`` to the path ``(root / value).resolve()`` gives (an
    absolute one is kept), resolving each distinct folder once: a full resolve walks every folder of the path again,
    item by item, and was most of the time to read 100,000 OmniMedVQA items, whose images share a few folders.

    With a ``root`` the user named (--images), an absolute path outside it that names no file is refused here, naming
    the item: a data file written on another machine (/home/author/...) otherwise failed on its first image with advice
    to pass the --images already given. One that exists is read as written, as the official code does, so a file
    mixing relative images with absolute masks elsewhere still reads."""

    def __init__(self, root: Path, named: bool = False) -> None:
        self.root = root
        self.named = named
        self._folders: dict[Path, Path] = {}

    def __call__(self, value: str, where: str = "") -> Path:
        p = Path(value)
        if p.is_absolute():
            if self.named and not _inside(p, self.root) and not p.exists():
                raise DataError(f"{where}: {value} does not exist: an absolute path is used as written, and --images "
                                f"{self.root} applies to relative paths only; make the data file's paths relative to "
                                "--images")
            return p
        joined = self.root / p
        # A name that is a link (or "..", or none) is resolved whole, as before: only a plain name is appended. So is
        # every path on Windows, whose resolve also gives the file name its spelling on disk.
        if joined.name in ("", "..") or os.name != "posix":
            return joined.resolve()
        folder = self._folders.get(joined.parent)
        if folder is None:
            folder = self._folders[joined.parent] = joined.parent.resolve()
        found = folder / joined.name
        return joined.resolve() if found.is_symlink() else found


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies under `folder`, as written or once links are resolved (the root a link to the data)."""
    def under(p: str, f: str) -> bool:
        return os.path.commonpath([p, f]) == f

    return under(os.path.abspath(path), os.path.abspath(folder)) or under(os.path.realpath(path),
                                                                            os.path.realpath(folder))


def _resolver(path: Path, image_root: str | Path | None) -> _Resolver:
    """Relative paths of the data file `path` join `image_root` (--images) if given, else the file's folder."""
    return _Resolver(path.parent) if image_root is None else _Resolver(Path(image_root), named=True)


def _check_unique(path: Path, items: list[EvalItem]) -> list[EvalItem]:
    """The items, if there are any and their ids are unique (an empty file would be reported as an empty run)."""
    if not items:
        raise DataError(f"{path}: holds no items")
    seen: set[str] = set()
    for i, it in enumerate(items):
        if it.id in seen:
            raise DataError(f"{path}: item {i}: duplicate id {it.id!r} (ids must be unique to resume and merge)")
        seen.add(it.id)
    return items


def _one_group_per_modality(items: list[EvalItem]) -> list[EvalItem]:
    """The items, each modality under one spelling (`one_spelling_each`): the report groups items by it."""
    for item, name in zip(items, one_spelling_each([it.modality for it in items]), strict=True):
        item.modality = name
    return items


def _question(path: Path, index: int, item, dotted: str) -> str:
    """The prompt without its ``<image>`` tag; one with nothing else would be refused by the engine mid-run."""
    question = _IMAGE_TAG.sub("", _text(path, index, item, dotted)).strip()
    if not question:
        raise DataError(f"{_where(path, index, item)}: field {dotted!r} holds no question besides its <image> tag")
    return question


def _mc_options(path: Path, index: int, item) -> list[str]:
    """option_A and option_B at least (C, D when present), each a string or number, as OmniMedVQA's."""
    for key in OPTION_KEYS[:2]:
        if key not in item:
            raise DataError(f"{_where(path, index, item)}: missing field {key!r} (a multiple-choice item needs its "
                            f"options, {' and '.join(OPTION_KEYS[:2])} at least)")
        _field(path, index, item, key)  # not null
    for key in OPTION_KEYS:
        if item.get(key) is not None:
            _text(path, index, item, key, numbers=True)
    return options_of(item)


def _gt_mask_files(resolve: _Resolver, where: str, last_id, entries) -> list[Path]:
    """The GT mask files of the last ``mask_ids`` entry, as the DiagSeg notebooks pick them: ``masks`` becomes a dict
    of mask id to file(s), so the last entry of an id wins, and a last entry that is a list of ids takes the union of
    their masks. Ids are compared as text (a file mixing 3 and "3" means one mask)."""
    if not isinstance(entries, list):
        raise DataError(f"{where}: 'masks' must be a list of [mask_id, png] entries")
    by_id: dict[str, list] = {}
    for entry in entries:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise DataError(f"{where}: each 'masks' entry must be [mask_id, png], got {entry!r}")
        by_id[str(entry[0])] = entry
    ids = last_id if isinstance(last_id, list) else [last_id]
    if not ids:
        raise DataError(f"{where}: the last 'mask_ids' entry is an empty list")
    files: list[Path] = []
    for mask_id in ids:
        entry = by_id.get(str(mask_id))
        if entry is None:
            of = f" (of the last 'mask_ids' entry {last_id!r})" if isinstance(last_id, list) else ""
            raise DataError(f"{where}: no entry of 'masks' has the last mask id {str(mask_id)!r}{of}")
        named = entry[1] if isinstance(entry[1], list) else [entry[1]]
        if not named or not all(isinstance(f, str) and f.strip() for f in named):
            raise DataError(f"{where}: the files of 'masks' entry {entry!r} must be PNG paths")
        files += [resolve(f, where) for f in named]
    return files


def read_diagseg(path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """DiagSeg ``SegVQA_Diagnostic_test_v2.json`` (with masks) or ``..._vqa.json`` (text only).

    GT text: ``conversations[1].value``, else ``short_answer``, else ``answer`` (the official order). The Dice
    target is the union of the PNGs listed in ``masks`` for the *last* ``mask_ids`` entry (`_gt_mask_files`).
    """
    path = Path(path)
    resolve = _resolver(path, image_root)
    items = []
    for i, raw in enumerate(_load_list(path)):
        where = _where(path, i, raw)
        qid = _text(path, i, raw, "qa_id", numbers=True)
        if isinstance(raw.get("conversations"), list) and len(raw["conversations"]) > 1:
            gt_field = "conversations.1.value"
        else:
            gt_field = "short_answer" if raw.get("short_answer") is not None else "answer"
        gt = _answer(path, i, raw, _field(path, i, raw, gt_field), gt_field)
        masks: list[Path] = []
        if "masks" in raw or "mask_ids" in raw:
            mask_ids = _field(path, i, raw, "mask_ids")
            if not isinstance(mask_ids, list) or not mask_ids:
                raise DataError(f"{where}: 'mask_ids' must be a non-empty list")
            masks = _gt_mask_files(resolve, where, mask_ids[-1], _field(path, i, raw, "masks"))
        items.append(EvalItem(
            id=qid, question=_question(path, i, raw, "question"), answer=gt,
            # Kept as given, a blank or missing one as "": run_eval.py scores only "open" and "close..." (it skips
            # "" and "mc", and fails on a missing one), and the report skips and names the others alike.
            answer_type=(_optional_text(path, i, raw, "answer_type") or "").lower(),
            image=resolve(_text(path, i, raw, "image_file"), where),
            modality=canonical_modality(_optional_text(path, i, raw, "modality")), masks=masks,
        ))
    return _check_unique(path, _one_group_per_modality(items))


def read_llava_vqa(path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """VQA-RAD / SLAKE / PathVQA in LLaVA(-Med) format: id, image, conversations, answer_type."""
    path = Path(path)
    resolve = _resolver(path, image_root)
    items = []
    for i, raw in enumerate(_load_list(path)):
        answer_type = _text(path, i, raw, "answer_type").lower()
        items.append(EvalItem(
            id=_text(path, i, raw, "id", numbers=True),
            question=_question(path, i, raw, "conversations.0.value"),
            answer=_answer(path, i, raw, _field(path, i, raw, "conversations.1.value"), "conversations.1.value"),
            answer_type=answer_type,  # kept as given: the report names types the official scoring skips
            image=resolve(_text(path, i, raw, "image"), _where(path, i, raw)),
            modality=canonical_modality(_optional_text(path, i, raw, "modality")),
        ))
    return _check_unique(path, _one_group_per_modality(items))


def _omni_file_modality(path: Path) -> str | None:
    """The modality a ``Modality_{m}.json`` file (the paper's per-modality files) names, else None."""
    return path.stem[len("Modality_"):] if path.stem.startswith("Modality_") else None


def _omni_item_modality(path: Path, index: int, raw) -> str | None:
    """The item's ``modality_type`` (the released files' field; one item of "Chest CT Scan.json" names it
    ``modality``), else None."""
    if isinstance(raw, Mapping):
        for key in ("modality_type", "modality"):
            value = _optional_text(path, index, raw, key)
            if value is not None:
                return value
    return None


def read_omnimed(path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """OmniMedVQA: one QA file, or a folder of them (read in name order): its ``Modality_*.json`` files where it
    has any (the paper's per-modality files), else every ``*.json`` (the release's ``QA_information/Open-access``,
    one file per source data set).

    The modality of a ``Modality_{m}.json`` file's items is ``m``, as the official per-file accuracy groups them;
    another file's are each item's ``modality_type`` (a file whose items have none: the file's name). Both are
    spelled as the paper's table (`canonical_modality`: "CT(Computed Tomography)" and Modality_CT.json are CT).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("Modality_*.json")) or sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: no Modality_*.json or other .json files in this folder")
        items: list[EvalItem] = []
        read_from: dict[str, Path] = {}
        for f in files:
            for i, item in enumerate(read_omnimed(f, image_root)):
                if item.id in read_from:  # the folder's items are one run: name both files, not a merged index
                    raise DataError(f"{f}: item {i}: duplicate id {item.id!r}, also in {read_from[item.id].name} "
                                    "(ids must be unique across the folder's files to resume and merge)")
                read_from[item.id] = f
                items.append(item)
        return _one_group_per_modality(items)  # Modality_CT.json and Modality_ct.json: one group
    resolve = _resolver(path, image_root)
    file_modality = _omni_file_modality(path)
    items = []
    for i, raw in enumerate(_load_list(path)):
        options = _mc_options(path, i, raw)
        question = _question(path, i, raw, "question")
        modality = file_modality or _omni_item_modality(path, i, raw) or path.stem
        items.append(EvalItem(
            id=_text(path, i, raw, "question_id", numbers=True), question=question + MC_SUFFIX,
            answer=_answer(path, i, raw, _field(path, i, raw, "gt_answer"), "gt_answer"), answer_type="mc",
            image=resolve(_text(path, i, raw, "image_path"), _where(path, i, raw)),
            modality=canonical_modality(modality), options=options,
        ))
    return _check_unique(path, _one_group_per_modality(items))


READERS = {"diagseg": read_diagseg, "vqa": read_llava_vqa, "mc": read_omnimed}


def read_items(task: str, path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """Dispatch on the task name: diagseg, vqa or mc."""
    if task not in READERS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(READERS)}")
    return READERS[task](path, image_root)
