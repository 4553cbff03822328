"""Training data readers: BiomedParse-like segmentation sets (stages 1-2) and LLaVA-style conversations (3-5).

Segmentation meta JSON (paths relative to the meta file's folder unless absolute)::

    {"roots": [...], "mask_roots": [...] (optional, default roots), "json_paths": [...], "modality_labels": [...]}

Each `json_paths[i]` is a COCO-like file whose `annotations` carry `image_id`, `file_name` (under `roots[i]`),
`mask_file` (under `mask_roots[i]`) and `category_id`; masks of one image are grouped by `image_id`.

Conversation JSON: a list of `{id, image, conversations: [{from, value}], mask_files: {id: png} | null,
mask_orders: [ids in code-mention order]}`; relative paths are looked up under the data root, then the JSON's
folder and its parent (the demo builder writes them relative to its output root, one level above the JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsight.model.preprocess import ResizeMode, prepare_image
from medsight.prompt import ASSISTANT_HEADER, IMAGE_PLACEHOLDER, Message, render_messages, tokenize_prompt
from medsight.tokens import CodeVocabulary, code_name
from medsight.train.checks import json_kind
from medsight.train.losses import training_labels
from medsight.user_files import check_user_file, is_other_aspect, read_user_image, read_user_json


def _digest_line(digest: hashlib._Hash, value: object) -> hashlib._Hash:
    """Add one JSON value to `digest` (keys sorted, no whitespace, a newline): the data fingerprint a checkpoint
    records of its run's data (`medsight.train.loop.DataIdentity`) is built of these, over what the data set reads.
    Cheap (the JSON, not the images it names) and blind to formatting: the same items re-indented are the same data;
    an edited answer, a swapped image path or a reordered list are not."""
    digest.update(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\n")
    return digest


def read_rgb(path: str | Path) -> np.ndarray:
    """8-bit (H, W, 3) image; an unreadable one, or one of more than 8 bits per pixel (which PIL would clip to
    white), is a ValueError naming it."""
    return read_user_image(path, "image", wide_ok=False)


def read_mask(path: str | Path) -> torch.Tensor:
    """(H, W) float {0, 1}: grey level > 0.5 of full scale, as the official `ToTensor() > 0.5`. A mask with pixels
    set but none above half scale is a ValueError naming it: a 0/1 label image (8- or 16-bit) or a palette mask of a
    dark colour, which the official rule reads as empty, so stage 1 trained its query towards an empty mask and the
    LVLM loss dropped it, silently."""
    grey = read_user_image(path, "mask", "L")
    top = int(grey.max(initial=0))
    if 0 < top <= 127:
        raise ValueError(f"the mask {path} has pixels set but none above half scale (its largest grey level is "
                         f"{top} of 255), so it would read as empty; masks are 0 outside and 255 inside (a 0/1 label "
                         "image must be scaled to 0/255)")
    return torch.from_numpy((grey.astype(np.float32) / 255.0 > 0.5).astype(np.float32))


def read_masks(paths: list[Path]) -> torch.Tensor:
    """(n, H, W) masks of one image. Masks of different sizes cannot be stacked (each is compared at its own
    resolution, but one image's masks share one tensor): a ValueError naming the files, where `torch.stack`'s
    RuntimeError named neither and escaped the readers' error handling (a mask replaced mid-run)."""
    masks = [read_mask(p) for p in paths]
    sizes = [tuple(m.shape) for m in masks]
    other = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if other is not None:
        raise ValueError(f"masks of one image differ in size: {paths[0]} is {sizes[0][1]}x{sizes[0][0]} pixels, "
                         f"{paths[other]} is {sizes[other][1]}x{sizes[other][0]}; they must be the same size")
    return torch.stack(masks)


def check_mask_aspect(image: Path, size: tuple[int, int], masks: list[Path], mask_sizes: tuple[int, int]) -> None:
    """Masks are compared at their own resolution, scaled onto the image's frame: a mask of another size but the
    image's aspect ratio fits it (within a pixel of rounding), one of another aspect ratio cannot be the image's
    and trained stretched over it, silently. `size` and `mask_sizes` are (height, width)."""
    (height, width), (mask_height, mask_width) = size, mask_sizes
    if is_other_aspect(size, mask_sizes):
        raise ValueError(f"the mask {masks[0]} is {mask_width}x{mask_height} pixels, the image {image} "
                         f"{width}x{height}: another aspect ratio, so it cannot be this image's mask")


def _item_name(path: Path, index: int, item: object) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"{path}: item {index}" + (f" (id {ident!r})" if ident is not None else "")


# ----------------------------------------------------------------------------------------------------------------
# Stages 1-2
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationSample:
    """One image: model-input pixels, its GT masks at native resolution, their classes and the modality label."""

    pixels: torch.Tensor  # (3, S, S)
    masks: torch.Tensor  # (G, H, W) float {0, 1}
    classes: torch.Tensor  # (G,) long
    modality: int


@dataclass
class _ImageRecord:
    image: Path
    masks: list[Path]
    classes: list[int]
    modality: int
    where: str = ""  # the annotation file and image_id, for an error reading it mid-run


class SegmentationDataset:
    """Reads the BiomedParse-like meta JSON; images go through `prepare_image` (the inference transform)."""

    def __init__(self, meta_path: str | Path, image_size: int, mean, std, resize_mode: ResizeMode = "crop",
                 num_classes: int | None = None, num_modalities: int | None = None) -> None:
        meta_path = Path(meta_path)
        meta = _check_meta(meta_path, read_user_json(meta_path, "segmentation meta file"))
        base = meta_path.parent
        roots, jsons, labels = meta["roots"], meta["json_paths"], meta["modality_labels"]
        mask_roots = meta.get("mask_roots") or roots
        if not len(roots) == len(jsons) == len(labels) == len(mask_roots):
            raise ValueError(f"{meta_path}: roots, mask_roots, json_paths and modality_labels differ in length")
        self.image_size, self.mean, self.std, self.resize_mode = image_size, mean, std, resize_mode
        labels = [_integer(f"{meta_path}: modality_labels[{i}]", v, "modality label") for i, v in enumerate(labels)]
        outside = sorted({m for m in labels if num_modalities is not None and not 0 <= m < num_modalities})
        if outside:
            # Stage 2 routes each image to its modality's codebook: checked here, not at the step that meets one.
            raise ValueError(f"{meta_path}: modality_labels {outside} outside the codebook's {num_modalities} "
                             f"modalities (0 to {num_modalities - 1})")
        self.records: list[_ImageRecord] = []
        # The fingerprint (`_digest_line`) covers only what is read here: the meta's lists and each
        # annotation's four fields, digested file by file as read. Keeping every annotation file to serialise it
        # whole cost as much memory as the files and doubled the start of a run on large sets; an edit to fields
        # never read (polygons, info) is the same training data.
        digest = _digest_line(hashlib.sha256(), [roots, mask_roots, jsons, labels])
        for root, mask_root, json_path, label in zip(roots, mask_roots, jsons, labels, strict=True):
            doc_path = base / json_path
            grouped: dict[object, _ImageRecord] = {}
            digest.update(b"file\n")
            for index, ann in enumerate(_annotations(doc_path, read_user_json(doc_path, "annotation file"))):
                _digest_line(digest, [ann[k] for k in ANNOTATION_FIELDS])
                image, mask = base / root / ann["file_name"], base / mask_root / ann["mask_file"]
                _check_files(f"{doc_path}: annotation {index}", [("image", image), ("mask", mask)])
                record = grouped.setdefault(ann["image_id"], _ImageRecord(
                    image, [], [], int(label), f"{doc_path}: image_id {json.dumps(ann['image_id'])}"))
                if record.image != image:  # its mask would be trained on the other image, and this image dropped
                    raise ValueError(f"{doc_path}: annotation {index}: image_id {json.dumps(ann['image_id'])} is "
                                     f"{ann['file_name']}, but an earlier annotation of that image_id is "
                                     f"{record.image.relative_to(base / root)}; one image_id must name one image")
                record.masks.append(mask)
                record.classes.append(ann["category_id"])
            self.records += list(grouped.values())
        if not self.records:
            raise ValueError(f"{meta_path}: no annotations in its json_paths; the training data set is empty")
        self.source, self.fingerprint = str(meta_path), digest.hexdigest()  # the meta and its json_paths
        if num_classes is not None:
            bad = sorted({c for r in self.records for c in r.classes if not 0 <= c < num_classes})
            if bad:
                raise ValueError(f"{meta_path}: category ids {bad} outside the model's {num_classes} classes")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegmentationSample:
        record = self.records[index]
        try:
            image, masks = read_rgb(record.image), read_masks(record.masks)
            check_mask_aspect(record.image, image.shape[:2], record.masks, tuple(masks.shape[-2:]))
        except ValueError as err:  # a file damaged or replaced since the run started
            raise ValueError(f"{record.where}: {err}") from None
        pixels, _ = prepare_image(image, self.image_size, self.mean, self.std, self.resize_mode)
        return SegmentationSample(pixels, masks, torch.tensor(record.classes, dtype=torch.long), record.modality)


META_FIELDS = ("roots", "json_paths", "modality_labels")
ANNOTATION_FIELDS = ("image_id", "file_name", "mask_file", "category_id")


def _check_meta(path: Path, meta: object) -> dict:
    """Stages 1-2 read a meta object; a conversation list here means stage-3-5 data was given to stage 1 or 2."""
    expected = f"stages 1-2 expect a segmentation meta JSON object with {', '.join(META_FIELDS)}"
    if isinstance(meta, list):
        raise ValueError(f"{path}: {expected}; this file is a list (conversation data is for stages 3-5)")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: {expected}; got a {json_kind(meta)}")
    missing = [k for k in META_FIELDS if not isinstance(meta.get(k), list)]
    if missing:
        raise ValueError(f"{path}: {expected}; missing or not a list: {', '.join(missing)}")
    return meta


def _annotations(path: Path, doc: object) -> list[dict]:
    """The `annotations` of a COCO-like file, each checked for the fields the dataset reads."""
    annotations = doc.get("annotations", []) if isinstance(doc, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: expected a JSON object with an 'annotations' list")
    checked = []
    for i, ann in enumerate(annotations):
        missing = [k for k in ANNOTATION_FIELDS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"{path}: annotation {i}: missing field(s) {', '.join(missing)}")
        unnamed = [k for k in ("file_name", "mask_file") if not isinstance(ann[k], str) or not ann[k]]
        if unnamed:  # null or a number: a TypeError out of pathlib, naming neither file nor annotation
            raise ValueError(f"{path}: annotation {i}: {unnamed[0]} must be a file name, got "
                             f"{json.dumps(ann[unnamed[0]])}")
        # Only the fields read: a copy of each whole annotation (polygons) would be kept until the file is done.
        checked.append({**{k: ann[k] for k in ANNOTATION_FIELDS},
                        "category_id": _integer(f"{path}: annotation {i}", ann["category_id"])})
    return checked


def _check_files(where: str, files: Iterable[tuple[str, Path]]) -> None:
    """Each (kind, path) is a file, checked when the data is read: a missing one would otherwise stop the run at the
    step that first reads it, hours in on a large set. ``files`` may be lazy: a path looked up under the data's
    roots raises FileNotFoundError, named with ``where`` too."""
    try:
        for kind, path in files:
            check_user_file(path, kind)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _integer(where: str, value: object, name: str = "category_id") -> int:
    """`value` as an int: an integral number or numeric string is taken (pandas exports write 3.0 or "3"), a
    fraction, a word, a boolean or NaN is refused naming `where`."""
    number = _number(value.strip()) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not float(number).is_integer():
        raise ValueError(f"{where}: {name} {json.dumps(value)} is not an integer")
    return int(number)


def _number(text: str) -> int | float | None:
    """The number a string spells ("3", "3.0", "1e1"), exact for integers; None for anything else."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return None


@dataclass
class SegmentationBatch:
    pixels: torch.Tensor  # (B, 3, S, S)
    masks: list[torch.Tensor]
    classes: list[torch.Tensor]
    modalities: list[int]


def collate_segmentation(samples: list[SegmentationSample]) -> SegmentationBatch:
    """Pixels stacked; masks stay a list because sizes and counts differ between images (official collate)."""
    return SegmentationBatch(
        torch.stack([s.pixels for s in samples]),
        [s.masks for s in samples],
        [s.classes for s in samples],
        [s.modality for s in samples],
    )


# ----------------------------------------------------------------------------------------------------------------
# Stages 3-5
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ConversationSample:
    """One teacher-forced conversation: ids/labels (one image placeholder), pixels and masks in code order."""

    input_ids: list[int]
    labels: list[int]
    pixels: torch.Tensor  # (3, S, S)
    masks: torch.Tensor | None  # (n, 1, H, W) in `mask_orders` order, or None


class ConversationDataset:
    """Reads the official LVLM JSON list; labels follow `training_labels` (the LLaVA-NeXT rule by default)."""

    def __init__(self, json_path: str | Path, tokenizer, image_size: int, mean, std,
                 resize_mode: ResizeMode = "crop", data_root: str | Path | None = None,
                 label_prompt_markup: bool = True, codes: CodeVocabulary | None = None,
                 max_length: int | None = None, image_embeddings: int = 1) -> None:
        """`max_length`: the language model's limit in embeddings (None: unchecked), of which the image takes
        `image_embeddings` (`MedSIGHTConfig.image_embeddings`); a longer item is refused (`check_lengths`)."""
        json_path = Path(json_path)
        self.items = read_user_json(json_path, "conversation file")
        if not isinstance(self.items, list):
            hint = " (a segmentation meta file is for stages 1-2)" if isinstance(self.items, dict) else ""
            raise ValueError(f"{json_path}: stages 3-5 expect a JSON list of conversation items, got a "
                             f"{json_kind(self.items)}{hint}")
        if not self.items:
            raise ValueError(f"{json_path}: no conversation items; the training data set is empty")
        self.json_path = json_path
        self.roots = [Path(r) for r in (data_root, json_path.parent, json_path.parent.parent) if r is not None]
        # The fingerprint (`_digest_line`) covers what a sample is made of (`read_fields`), as the
        # segmentation data's does: an edited id or a field never read (a source, notes) is the same training data.
        digest = hashlib.sha256()
        # Each item's rendered conversation in UTF-8 bytes after the tokenizer's normalizer (`check_lengths`).
        normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
        normalized = normalizer.normalize_str if normalizer is not None else str
        self._text_bytes: list[int] = []
        for index, item in enumerate(self.items):
            where = _item_name(json_path, index, item)
            self._text_bytes.append(sum(len(normalized(text).encode())
                                        for text in check_conversation_item(where, item, codes)))
            self._check_item_files(where, item)
            _digest_line(digest, read_fields(item))
        self.source, self.fingerprint = str(json_path), digest.hexdigest()
        # Region codes per item, as `lvlm_losses` counts them (the model's code tokens anywhere in the conversation;
        # none decodes one slot): a batch of more than one sample needs one count unless its slots are padded. Only
        # the model's vocabulary says which code-like text is a code token, so without `codes` there is no count.
        self.code_slots = None if codes is None else [
            max(1, sum(codes.count_codes(t["value"]) for t in item["conversations"])) for item in self.items]
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std, self.resize_mode = image_size, mean, std, resize_mode
        self.label_prompt_markup = label_prompt_markup
        self.max_length, self.image_embeddings = max_length, image_embeddings
        if max_length is not None:
            self.check_lengths()

    def length(self, item: dict) -> int:
        """The item's sequence in embeddings (`_embeddings` of its ids)."""
        return self._embeddings(tokenize_prompt(self.tokenizer, training_messages(item["conversations"])))

    def _embeddings(self, ids: Sequence[int]) -> int:
        """How many embeddings a sequence of `ids` is: the image placeholder replaced by the image's embeddings."""
        return len(ids) - 1 + self.image_embeddings

    def check_lengths(self) -> None:
        """Refuse items longer than `max_length`, naming how many and the first, before training: the language model
        refuses one at the step that draws it, hours in, where the official code cut it to the limit and so
        trained on a conversation without its answer. Only an item whose rendered text has more UTF-8 bytes than
        the limit leaves room for is tokenised (a byte-level BPE token is at least one byte of the normalised text:
        Qwen3's NFC turns some characters into up to 3 times their bytes; a few seconds for 100k items where
        tokenising all took minutes); `__getitem__` checks every sample it makes as well."""
        assert self.max_length is not None
        room = self.max_length - self.image_embeddings + 1  # the placeholder is one id
        long = []
        for index, item in enumerate(self.items):
            if self._text_bytes[index] > room:
                length = self.length(item)
                if length > self.max_length:
                    long.append((index, length))
        if long:
            index, length = long[0]
            raise ValueError(f"{len(long)} item(s) of {self.json_path} are longer than the model's {self.max_length} "
                             f"embeddings (conversation and image, {self.image_embeddings} of them the image's), "
                             f"first {_item_name(self.json_path, index, self.items[index])}: {length}; shorten or "
                             "remove them (the official code cut them at the limit, answer included)")

    def __len__(self) -> int:
        return len(self.items)

    def check_batches(self, batch_size: int, pad_code_slots: bool) -> None:
        """Samples batched together must have the same number of region codes unless `pad_code_slots` (the official
        collator stacks them): refused up front, naming two items that differ, not at whichever step first draws
        them together (after --out already holds the run)."""
        if batch_size == 1 or pad_code_slots:
            return
        if self.code_slots is None:
            raise ValueError(f"batch_size {batch_size} without pad_code_slots: {self.json_path} was read without the "
                             "model's region codes (codes=model.codes), so its items' code counts are unknown")
        if len(set(self.code_slots)) == 1:
            return
        first = self.code_slots[0]
        other = next(i for i, n in enumerate(self.code_slots) if n != first)
        names = [f"{_item_name(self.json_path, i, self.items[i])} has {self.code_slots[i]}" for i in (0, other)]
        raise ValueError(f"batch_size {batch_size}: every sample of a batch must decode the same number of region "
                         f"codes (official collator; an item without codes decodes one), but {names[0]} and "
                         f"{names[1]}; set pad_code_slots to true (padded slots, a deviation) or batch_size to 1")

    def _check_item_files(self, where: str, item: dict) -> None:
        """Every image and mask the item names is a file (`_check_files`)."""
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        files = item.get("mask_files") or {}
        masks = [("mask", files[str(m)]) for m in item.get("mask_orders") or []]
        # An absolute path is not looked up by `resolve`.
        _check_files(where, ((what, self.resolve(path)) for what, path in [("image", image), *masks]))

    def resolve(self, path: str) -> Path:
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        for root in self.roots:
            if (root / candidate).exists():
                return root / candidate
        raise FileNotFoundError(f"{path} not found under {', '.join(map(str, self.roots))}")

    def __getitem__(self, index: int) -> ConversationSample:
        item = self.items[index]
        try:
            return self._sample(item)
        except (ValueError, FileNotFoundError) as err:  # a file damaged, moved or replaced since the run started
            raise ValueError(f"{_item_name(self.json_path, index, item)}: {err}") from None

    def _sample(self, item: dict) -> ConversationSample:
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        image_path = self.resolve(image)
        rgb = read_rgb(image_path)
        pixels, _ = prepare_image(rgb, self.image_size, self.mean, self.std, self.resize_mode)
        ids, labels = training_labels(self.tokenizer, training_messages(item["conversations"]), num_images=1,
                                      label_prompt_markup=self.label_prompt_markup)
        if self.max_length is not None and self._embeddings(ids) > self.max_length:
            raise ValueError(f"{self._embeddings(ids)} embeddings long, more than the model's {self.max_length}; "
                             "shorten or remove it")
        order = item.get("mask_orders") or []
        masks = None
        if order:
            files = item.get("mask_files") or {}
            paths = [self.resolve(files[str(m)]) for m in order]
            masks = read_masks(paths)[:, None]
            check_mask_aspect(image_path, rgb.shape[:2], paths, tuple(masks.shape[-2:]))
        return ConversationSample(ids, labels, pixels, masks)


def read_fields(item: dict) -> list:
    """What `ConversationDataset` makes a sample of (a checked item): the image, each turn's role and text, and the
    masks in code order with their files."""
    image = item["image"][0] if isinstance(item["image"], list) else item["image"]
    files = item.get("mask_files") or {}
    return [image, [[t["from"], t["value"]] for t in item["conversations"]],
            [[str(m), files[str(m)]] for m in item.get("mask_orders") or []]]


def training_messages(turns: list[dict]) -> list[Message]:
    """The turns of a training item as the official training read makes them (`LazySupervisedDataset.__getitem__`):
    each turn's `<image>` removed and its text stripped of surrounding whitespace, before `render_messages` puts
    `<image>\n` first. LLaVA-style data writes "<image>\nQuestion": unstripped it rendered "<image>\n\nQuestion"
    (Qwen's "\n\n" id where the official sequence has "\n"). Inference keeps the text as typed, as the chatbot."""
    return [Message(t["from"], t["value"].replace(IMAGE_PLACEHOLDER, "").strip()) for t in turns]


def check_conversation_item(where: str, item: object, codes: CodeVocabulary | None = None) -> list[str]:
    """An item must have one image, a conversation the prompt renders, a file for every mask it orders and (with
    `codes`, the model's) only region codes the model has; checked up front so a bad item stops the run before
    training, named, rather than as a KeyError mid-run or, for an unknown code, silently trained as plain text
    while its mask trains the state at position 0 (`lvlm_losses` decodes that state for a sample with no code).
    Returns the conversation's rendered turns (`render_messages`)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with image and conversations, got a {json_kind(item)}")
    missing = [k for k in ("image", "conversations") if k not in item]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    if len(images) != 1:  # `lvlm_losses` pairs one encoding with each sample
        raise ValueError(f"{where}: {len(images)} images; only one image per item is supported")
    if not isinstance(images[0], str) or not images[0]:
        raise ValueError(f"{where}: field 'image' must be a file path, got {json.dumps(images[0])}")
    turns = item["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    bad = [i for i, t in enumerate(turns)
           if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str)]
    if bad:
        raise ValueError(f"{where}: conversations[{bad[0]}] must be an object with string 'from' and 'value'")
    try:
        rendered = render_messages(training_messages(turns))
    except ValueError as err:  # unknown role, no user turn
        raise ValueError(f"{where}: {err}") from None
    if not any(text.startswith(ASSISTANT_HEADER) for text in rendered):
        # Nothing to supervise: with label_prompt_markup off every label is -100 and the step's loss NaN (stopped as
        # a diverged run); with the official rule it trained on the prompt's newlines and chat markers alone.
        raise ValueError(f"{where}: the conversation has no answer (no gpt or assistant turn) to train on")
    _check_codes(where, turns, codes)
    files = item.get("mask_files") or {}
    order = item.get("mask_orders") or []
    absent = [m for m in order if not isinstance(files, dict) or str(m) not in files]
    if absent:
        raise ValueError(f"{where}: mask_orders names {absent[0]!r}, which mask_files does not list")
    unnamed = [m for m in order if not isinstance(files[str(m)], str) or not files[str(m)]]
    if unnamed:  # null or a number: a TypeError out of pathlib, naming neither item nor mask
        raise ValueError(f"{where}: mask_files[{str(unnamed[0])!r}] must be a file path, got "
                         f"{json.dumps(files[str(unnamed[0])])}")
    mentioned = None if codes is None else sum(codes.count_codes(t["value"]) for t in turns)
    if mentioned is not None and mentioned != len(order):
        # The k-th code's state is decoded against the k-th mask (`mask_targets`): with other counts every mask
        # after the first gap trains another code's state, or a code trains to no mask, silently. The official
        # data builder checked this equality; a hand-made or edited set may not hold it.
        raise ValueError(f"{where}: its conversation names {mentioned} region code(s) but mask_orders lists "
                         f"{len(order)} mask(s); each code must have its mask, in the order the codes appear")
    return rendered


def _check_codes(where: str, turns: list[dict], codes: CodeVocabulary | None) -> None:
    for i, turn in enumerate(turns):
        unknown = codes.unknown_codes(turn["value"]) if codes is not None else []
        if unknown:
            first, last = code_name(0, 0), code_name(codes.num_modalities - 1, codes.codebook_size - 1)
            raise ValueError(f"{where}: conversations[{i}] has region code {unknown[0]}, which is not in the model's "
                             f"vocabulary ({first} to {last}); it would be trained as plain text")


def collate_conversations(samples: list[ConversationSample]) -> list[ConversationSample]:
    """Kept as a list: `lvlm_losses` pads itself (batch size 1 per step is the official setting)."""
    return list(samples)
