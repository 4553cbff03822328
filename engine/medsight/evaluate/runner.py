"""Inference for evaluation: resumable JSONL predictions, sharding, and merging shards.

One JSON line per item, written and fsync'ed as soon as the item is answered, so an interrupted run loses at most
the item in flight and a rerun skips every id already in the file. Each line records what its item was asked
(`input_fingerprint`); a rerun whose data gives an answered id another question, image, GT mask or position is
refused, so answers to different data are never mixed in one report. Shard i of n takes items i::n (after
``limit``); each item's sampling seed depends on its position in the input file, never on the shard, so a
sharded run with batch 1 reproduces the single-process predictions exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.evaluate.metrics import binarize_logits
from medsight.evaluate.readers import DataError, EvalItem
from medsight.server.rle import decode_mask, encode_mask
from medsight.user_files import check_user_image, read_user_image

#: Prediction record fields (the official inference.py writes question_id, prompt, text, gt_ans, metadata).
Prediction = dict
#: Fields every prediction record has (the official inference.py's answers too).
RECORD_KEYS = ("question_id", "text")
#: Image and mask files are known by their size and first bytes (a PNG's header and first rows of pixels).
INPUT_SAMPLE = 1 << 16
#: Where a missing image or mask was looked for (`medsight.evaluate.readers` joins relative paths so).
PATHS_HINT = ("relative image and mask paths of the data file are joined to --images, by default the data file's "
              "folder: pass --images with the folder they are relative to; absolute ones are used as written")
#: Items named in the error for answers to other inputs.
SHOWN_ITEMS = 5


@dataclass(frozen=True)
class RunOptions:
    """How items are asked.

    Attributes:
        task: "diagseg" (greedy segmentation path, masks kept), "vqa" or "mc" (VQA path, text only).
        sampling: "official" (VQA path sampled at T=0.2 as `inference.py`; segmentation greedy) or "greedy".
        batch: consecutive items with the same question asked in one engine call (1 = official batch size).
        resize_mode: "crop" is the official preprocessing (the mask frame the official Dice assumes).
    """

    task: str
    max_new_tokens: int | None = None  # None: GenerationOptions' default
    sampling: str = "official"
    seed: int = 0
    batch: int = 1
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        if self.task not in ("diagseg", "vqa", "mc"):
            raise ValueError(f"unknown task {self.task!r}")
        if self.sampling not in ("official", "greedy"):
            raise ValueError("sampling must be 'official' or 'greedy'")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")

    @property
    def segment(self) -> bool:
        return self.task == "diagseg"

    @property
    def sampled(self) -> bool:
        return self.sampling == "official" and not self.segment

    def generation(self, seed: int | None = None):
        """GenerationOptions of the official path for this task."""
        from medsight.model.generation import DEFAULT_MAX_NEW_TOKENS, GenerationOptions

        limit = DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens
        if self.sampled:
            # inference.py: sampled T=0.2, penalty 1.2; top_k/top_p from Qwen3's generation_config (inferred).
            return GenerationOptions(max_new_tokens=limit, do_sample=True, temperature=0.2, top_k=20,
                                     top_p=0.95, repetition_penalty=1.2, seed=seed)
        # Segmentation path: greedy, penalty 1.2 kept; DiagSeg scores the no-code fallback mask, so keep it.
        return GenerationOptions(max_new_tokens=limit, do_sample=False, repetition_penalty=1.2,
                                 no_code_fallback=self.segment)


# -- sharding ------------------------------------------------------------------------------------------------------
def shard_from_env(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """Explicit --shard/--num-shards, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if shard is None and num_shards is None:
        shard, num_shards = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    elif shard is None or num_shards is None:
        # --num-shards alone was shard 0 on every machine: one shard answered (and appended to) twice, none else.
        given = "--num-shards" if shard is None else "--shard"
        raise ValueError(f"{given} needs {'--shard' if shard is None else '--num-shards'} too: each process takes "
                         "--shard i (0 <= i < n) of --num-shards n")
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards")
    return shard, num_shards


def select_items(items: Sequence[EvalItem], shard: int = 0, num_shards: int = 1,
                 limit: int | None = None) -> list[tuple[int, EvalItem]]:
    """(position in the input file, item) for items[:limit][shard::num_shards]."""
    if limit is not None and limit < 1:  # a negative slice would silently drop items from the end
        raise ValueError(f"--limit {limit}: must be at least 1 (leave it out for every item)")
    indexed = list(enumerate(items))[: limit if limit is not None else None]
    return indexed[shard::num_shards]


def prediction_path(report_dir: str | Path, name: str = "predictions", shard: int = 0, num_shards: int = 1) -> Path:
    """predictions.jsonl, or predictions.shard{i}-of-{n}.jsonl for a shard."""
    suffix = "" if num_shards == 1 else f".shard{shard}-of-{num_shards}"
    return Path(report_dir) / f"{name}{suffix}.jsonl"


# -- JSONL ---------------------------------------------------------------------------------------------------------
def read_predictions(path: str | Path, repair: bool = False) -> list[Prediction]:
    """All complete records of a JSONL file (missing file: none).

    A last line without its newline is an interrupted write: it is ignored, and with ``repair`` cut off so the
    next append starts on a fresh line. A bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError as err:  # a hand-edited or damaged file: name it, as a bad JSON line is named
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text ({err.reason}); a predictions file holds one JSON "
                        "object per line") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err})") from None
        # Resume, merge and report index every record by these (a hand-merged file may lack them).
        if not isinstance(rec, dict) or not all(k in rec for k in RECORD_KEYS):
            raise DataError(f"{path}: line {n} is not a prediction (a JSON object with "
                            f"{' and '.join(repr(k) for k in RECORD_KEYS)})")
        out.append(rec)
    return out


def append_predictions(path: str | Path, records: Iterable[Prediction]) -> None:
    """Append records, one line each, and fsync so a crash cannot lose an acknowledged item."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_shards(paths: Sequence[str | Path], order: Sequence[str] | None = None) -> list[Prediction]:
    """Records of all shard files, deduplicated by question_id (first wins), in ``order`` (input-file ids)."""
    by_id: dict[str, Prediction] = {}
    for p in paths:
        for rec in read_predictions(p):
            by_id.setdefault(str(rec["question_id"]), rec)
    if order is None:
        return list(by_id.values())
    rank = {qid: i for i, qid in enumerate(order)}
    return sorted(by_id.values(), key=lambda r: rank.get(str(r["question_id"]), len(rank)))


# -- inputs --------------------------------------------------------------------------------------------------------
#: An item's sampling seed is the run's times this plus the item's position in the input file (`item_seed`).
ITEM_SEED_STRIDE = 1_000_003
#: The largest run seed whose items' seeds (positions below ITEM_SEED_STRIDE) torch's generator still takes: 2**64 - 1
#: is `medsight.server.schemas.SEED_MAX`, not imported (it loads torch; a test checks they agree).
LARGEST_RUN_SEED = (2**64 - 1 - (ITEM_SEED_STRIDE - 1)) // ITEM_SEED_STRIDE


def item_seed(options: RunOptions, index: int) -> int | None:
    """The sampling seed of the item at `index` in the input file (None for greedy runs)."""
    return options.seed * ITEM_SEED_STRIDE + index if options.sampled else None


def input_fingerprint(item: EvalItem, options: RunOptions) -> dict[str, str | None]:
    """What an answer was asked: a hash of the question, and of the image's (and, for segmentation, the GT masks':
    stored masks lie on their grid) sizes and first bytes. Paths are left out, so a moved data set still matches.
    "files" is None while a file cannot be read (a report rebuilt where the images are not: nothing to compare)."""
    samples = [_file_sample(f) for f in [item.image, *(item.masks if options.segment else [])]]
    return {"question": hashlib.sha256(item.question.encode()).hexdigest()[:16],
            "files": None if None in samples else hashlib.sha256(json.dumps(samples).encode()).hexdigest()[:16]}


def _file_sample(f: Path) -> str | None:
    try:
        with open(f, "rb") as fh:
            return f"{os.fstat(fh.fileno()).st_size} {hashlib.sha256(fh.read(INPUT_SAMPLE)).hexdigest()}"
    except OSError:
        return None


def check_inputs(path: Path, records: Sequence[Prediction], selected: Sequence[tuple[int, EvalItem]],
                 options: RunOptions) -> None:
    """Refuse `records` that answered another question, image, GT mask or position than their ids have now (another
    --data file, an edited one, another --images folder); records of older medsight versions carry no inputs."""
    current = {it.id: (i, it) for i, it in selected}
    changed = []
    for rec in records:
        index, item = current.get(str(rec["question_id"]), (None, None))
        meta = rec.get("metadata") or {}
        if item is None:
            continue
        stored, what = meta.get("input"), []
        if isinstance(stored, dict):
            now = input_fingerprint(item, options)
            what += [{"question": "question", "files": "image or mask file"}[k] for k in now
                     if now[k] is not None and stored.get(k) != now[k]]
        if "seed" in meta and meta["seed"] != item_seed(options, index):
            what.append("position in the data file, which seeds its sampling")
        if what:
            changed.append(f"{item.id!r} ({', '.join(what)})")
    if changed:
        more = f" and {len(changed) - SHOWN_ITEMS} more" if len(changed) > SHOWN_ITEMS else ""
        raise DataError(f"{path} holds answers to {len(changed)} item(s) that this command's data asks otherwise: "
                        f"{', '.join(changed[:SHOWN_ITEMS])}{more}. They were asked about another --data file, an "
                        "edited one or another --images folder; choose another --report folder for this data")


# -- masks ---------------------------------------------------------------------------------------------------------
def encode_masks(masks: Sequence[np.ndarray], shape: Sequence[int]) -> dict:
    """(K, H, W) masks of one prediction as stored in the predictions file: the grid shape and each mask's RLE
    counts (the API's run-length encoding, `medsight.server.rle`)."""
    return {"shape": [int(s) for s in shape], "rle": [encode_mask(m)["counts"] for m in masks]}


def decode_masks(stored: dict, shape: Sequence[int]) -> np.ndarray:
    """(K, H, W) masks of a stored prediction on a grid of ``shape``; a DataError names a corrupt one."""
    if not isinstance(stored, dict) or not isinstance(stored.get("rle"), list):
        raise DataError("stored masks: expected {\"shape\": [H, W], \"rle\": [counts of each mask]}")
    try:
        masks = [decode_mask({"shape": list(shape), "counts": counts}) for counts in stored["rle"]]
    except (ValueError, TypeError) as err:  # TypeError: counts that are no numbers (null, objects)
        raise DataError(f"stored mask: {err}") from None
    return np.stack(masks) if masks else np.zeros((0, *shape), dtype=bool)


def load_gt_mask(paths: Sequence[Path]) -> np.ndarray:
    """Union of the GT mask PNGs, read as grayscale and binarised at > 127 (as the notebooks)."""
    union = None
    for p in paths:
        m = read_user_image(p, "mask", "L", DataError) > 127
        if union is not None and union.shape != m.shape:
            raise DataError(f"mask {p} is {m.shape}, the other masks of its item are {union.shape}")
        union = m if union is None else union | m
    if union is None:
        raise DataError("item has no GT mask")
    return union


# -- running -------------------------------------------------------------------------------------------------------
def _groups(pending: list[tuple[int, EvalItem]], options: RunOptions) -> Iterable[list[tuple[int, EvalItem]]]:
    """Consecutive items sharing a question, up to ``batch``; sampled runs ask one item at a time so each item
    keeps its own seed."""
    size = 1 if options.sampled else options.batch
    group: list[tuple[int, EvalItem]] = []
    for entry in pending:
        if group and (len(group) == size or group[-1][1].question != entry[1].question):
            yield group
            group = []
        group.append(entry)
    if group:
        yield group


def check_files(pending: Sequence[tuple[int, EvalItem]], options: RunOptions, progress: str | None = None) -> None:
    """Every file the pending items need is a file, checked before the first answer (a missing one would otherwise
    stop a long run part-way), and every segmentation item has GT masks (a DiagSeg _vqa.json passed as --data has
    none: its first answer was asked, then lost to the error). Images and GT masks are checked whole too, from their
    headers and structure without decoding (`check_user_image`), so an unreadable one stops the run before its first
    answer, not when its item comes. A missing file's error says where relative paths are looked for (OmniMedVQA's
    and VQA-RAD's images lie outside the data file's folder). ``progress`` labels a progress bar on stderr (a JPEG is
    decoded at 1/8 scale: some minutes for OmniMedVQA's 88k items, which must not look like a hang)."""
    from tqdm import tqdm

    for _, item in tqdm(pending, desc=progress and f"{progress}: checking files", unit="item", leave=False,
                        disable=progress is None, file=sys.stderr):
        if options.segment and not item.masks:
            raise DataError(f"item {item.id!r} has no GT mask ('mask_ids' and 'masks') to score its Dice against: "
                            "--data takes the DiagSeg file with masks (SegVQA_Diagnostic_test_v2.json), the text-only "
                            "_vqa.json goes to --vqa-data")
        try:
            check_user_image(item.image, "image", DataError)
            if options.segment:
                check_gt_masks(item.masks)
        except DataError as err:
            missing = not all(f.exists() for f in [item.image, *item.masks])
            raise DataError(f"item {item.id!r}: {err}" + (f" ({PATHS_HINT})" if missing else "")) from None


def check_gt_masks(paths: Sequence[Path]) -> None:
    """The GT mask files `load_gt_mask` will read are whole images of one size, from their headers and structure
    without decoding their pixels (an unreadable or mismatched mask was found only after its item was answered)."""
    shape = None
    for p in paths:
        size = check_user_image(p, "mask", DataError)
        if shape is not None and size != shape:
            raise DataError(f"mask {p} is {size}, the other masks of its item are {shape}")
        shape = size


def item_image(item: EvalItem) -> np.ndarray:
    """The item's pixels; an unreadable file is a DataError naming the item and the file."""
    try:
        return read_user_image(item.image, "image", error=DataError)  # RGB, as the official chatbot converts
    except DataError as err:
        raise DataError(f"item {item.id!r}: {err}") from None


def stopped_note(kept: int, total: int, path: str | Path, elsewhere: bool = False) -> str:
    """What a run stopped part-way keeps, and how to go on (the report is written only after the last answer).
    `elsewhere`: some of them were answered in the report's other predictions files (shards)."""
    where = f"{path} and the report's other predictions files" if elsewhere else path
    return (f"{kept} of {total} items are answered and kept in {where}; the same command resumes after them (the "
            "report is written once every item is answered)")


def item_gt_mask(item: EvalItem) -> np.ndarray:
    """The union of the item's GT masks; an unreadable one is a DataError naming the item and the file."""
    try:
        return load_gt_mask(item.masks)
    except DataError as err:
        raise DataError(f"item {item.id!r}: {err}") from None


def _record(index: int, item: EvalItem, answer, options: RunOptions, seed: int | None,
            gt: np.ndarray | None = None) -> Prediction:
    rec: Prediction = {
        "question_id": item.id, "prompt": item.question, "text": answer.text, "gt_ans": item.answer,
        "answer_type": item.answer_type, "modality": item.modality,
        "metadata": {"index": index, "codes": [r.code for r in answer.regions], "seed": seed,
                     "task": options.task, "sampling": options.sampling, "input": input_fingerprint(item, options)},
    }
    if options.segment:
        gt = item_gt_mask(item) if gt is None else gt
        logits = [r.mask_logits for r in answer.regions]
        import torch

        stacked = torch.stack(logits) if logits else torch.zeros(0, 1, 1)
        masks = binarize_logits(stacked, gt.shape)
        rec["masks"] = encode_masks(masks, gt.shape)
        # The engine's masks on the image (crop or letterbox inverted), for the strict Dice on non-square images.
        rec["masks_image"] = encode_masks([_on_grid(r.mask, gt.shape) for r in answer.regions], gt.shape)
    return rec


def _on_grid(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask on the image's grid, resized (nearest) to a GT mask of another resolution."""
    if mask.shape == tuple(shape):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST)) > 0


def run_predictions(
    engine,
    items: Sequence[EvalItem],
    out_path: str | Path,
    options: RunOptions,
    shard: int = 0,
    num_shards: int = 1,
    limit: int | None = None,
    progress: str | None = None,
    answered: Sequence[str | Path] = (),
) -> list[Prediction]:
    """Answer this shard's items not yet in ``out_path`` and append them; returns the shard's records in order.

    ``engine`` is a `medsight.Engine` (or anything with the same ``ask``). ``progress`` labels a progress bar on
    stderr (None: no bar). ``answered``: the report's other predictions files (merged, or shards of another
    number of processes), read only: their answers count as done, so a run resumed on more or fewer processes
    does not ask again what is answered (the final merge takes every file).
    """
    from tqdm import tqdm

    from medsight.model.medsight import ImageOptions

    selected = select_items(items, shard, num_shards, limit)
    existing = read_predictions(out_path, repair=True)
    check_inputs(Path(out_path), existing, selected, options)
    done = {str(r["question_id"]) for r in existing}
    for other in answered:
        records = read_predictions(other)  # a shard still being written ends at its last complete line
        check_inputs(Path(other), records, selected, options)
        done |= {str(r["question_id"]) for r in records}
    pending = [(i, it) for i, it in selected if it.id not in done]
    wanted = {it.id for _, it in selected}
    # Whether some of the answers a stopped run keeps are in the other files (its message names them too).
    elsewhere = len(selected) - len(pending) > len({str(r["question_id"]) for r in existing} & wanted)
    check_files(pending, options, progress)
    image_options = ImageOptions(resize_mode=options.resize_mode)
    bar = tqdm(total=len(selected), initial=len(selected) - len(pending), desc=progress, unit="item",
               disable=progress is None, file=sys.stderr)
    kept = len(selected) - len(pending)
    try:
        for group in _groups(pending, options):
            seed = item_seed(options, group[0][0])
            # The GT masks are read before the answer is asked, so an unreadable one costs no answer.
            gts = [item_gt_mask(it) if options.segment else None for _, it in group]
            answers = engine.ask([item_image(it) for _, it in group], group[0][1].question,
                                 options.generation(seed), image_options)
            records = [_record(i, it, a, options, seed, gt) for (i, it), a, gt in zip(group, answers, gts, strict=True)]
            try:
                append_predictions(out_path, records)
            except OSError as err:  # a full disk: the error names no file; say which, and what is kept
                note = stopped_note(kept, len(selected), out_path, elsewhere)  # a torn last line is mended on resume
                raise OSError(err.errno, f"{err.strerror or err}; {note}", os.fspath(out_path)) from None
            kept += len(group)
            bar.update(len(group))
    except DataError as err:
        # A file the check before the run passed (a PNG's damaged pixel stream) stopped it part-way.
        note = stopped_note(kept, len(selected), out_path, elsewhere)
        raise DataError(f"{err}. Mend or replace that file: {note}") from None
    except KeyboardInterrupt:
        print(f"\n{stopped_note(kept, len(selected), out_path, elsewhere)}", file=sys.stderr)
        raise
    finally:
        bar.close()
    records = [r for r in read_predictions(out_path) if str(r["question_id"]) in wanted]
    return _ordered(records, [it.id for _, it in selected])


def _ordered(records: list[Prediction], order: Sequence[str]) -> list[Prediction]:
    by_id: dict[str, Prediction] = {}
    for r in records:
        by_id.setdefault(str(r["question_id"]), r)
    return [by_id[q] for q in order if q in by_id]
