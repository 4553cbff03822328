"""Question/answer templates for the LVLM stages (3-5) and region-code placeholder filling.

Answers mention masks through placeholders ``{code:<mask_id>}``; once the stage-2 codebook exists,
`fill_codes` turns them into ``[M{m}_{k}]`` tokens and fills ``mask_codes``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

import numpy as np

from .catalog import LESION_FINDING, LESION_SITE, PLURAL, SOURCES, UNKNOWN_STRUCTURES, WHOLES
from .samples import Sample2D

PLACEHOLDER = re.compile(r"\{code:([^{}]+)\}")
CODE = re.compile(r"^\[?(M\d+_\d+)\]?$")
CODE_TOKEN = re.compile(r"\[M\d+_\d+\]")


def placeholder(mask_id: str) -> str:
    """The text standing for a mask's region code until codes are known."""
    return "{code:" + mask_id + "}"


def mask_id(sample_id: str, structure: str) -> str:
    """Globally unique mask id, also the mask PNG's stem (so a code can be looked up from either)."""
    return f"{sample_id}_{structure.replace(' ', '_')}"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


SEG_Q = (
    "Please segment the {s}.", "Segment the {s}.", "Can you outline the {s}?",
    "Where {be} the {s}? Please segment {it}.",
)
SEG_A = ("{S} segmented as {c}.", "The {s} {be} segmented as {c}.", "{S}: {c}.")
#: The answer to a segmentation question about a structure the slice does not show or the model does not know.
NOT_VISIBLE_A = "The {s} {be} not visible in this image."
NOT_VISIBLE = "not visible in this image"
MULTI_Q = ("Please segment all the structures.", "Segment the {list}.", "Please segment the {list}.")
MODALITY_Q = (
    "What imaging modality is this?", "Which modality was used to acquire this image?", "What kind of scan is this?"
)
#: How every lesion-presence question opens, and the organ-visibility question: `closed_kind` recognises the two
#: closed (yes/no) kinds by them, for the evaluation and the stage-5 balancing.
PRESENCE_Q = "Is there a lesion"
VISIBLE_Q = "Is the {s} visible in this image?"
DIAG_Q = ("What abnormality is seen in this image?", "Is there anything abnormal in this image?",
          "What is the main finding?")


def _forms(name: str) -> dict[str, str]:
    """Template fields for a structure name: singular or plural verb and pronoun."""
    plural = name in PLURAL
    return {"s": name, "S": _cap(name), "be": "are" if plural else "is", "it": "them" if plural else "it"}


def _seg_turn(sample: Sample2D, rng: np.random.Generator, names: list[str]) -> tuple[str, str, list[str]]:
    """A single- or multi-structure segmentation exchange; returns (question, answer, mask ids in order)."""
    ids = [mask_id(sample.sample_id, n) for n in names]
    if len(names) == 1:
        s = names[0]
        q = SEG_Q[rng.integers(len(SEG_Q))].format(**_forms(s))
        a = SEG_A[rng.integers(len(SEG_A))].format(**_forms(s), c=placeholder(ids[0]))
        return q, a, ids
    q = MULTI_Q[rng.integers(len(MULTI_Q))].format(list=_join(names))
    parts = [f"{n} {placeholder(i)}" for n, i in zip(names, ids, strict=True)]
    a = _cap(", ".join(parts)) + "." if rng.random() < 0.5 else "Segmentations: " + ", ".join(parts) + "."
    return q, a, ids


#: Share of the not-visible questions on a slice showing some of its structures that ask about one of its own it
#: lacks (the rest ask about another source's or an unknown one). At 0.5, a kidney question on a CT slice was
#: answered "not visible" almost as often as it was segmented, more than the small model can tell apart from the
#: image: two of five one-hour runs answered "not visible" about kidneys in plain view (Dice 0 each).
OWN_MISSING_P = 0.2


def _not_visible_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """"Segment the X." about a structure the slice lacks: with `OWN_MISSING_P` one of its own source that has no
    pixel here (an organ above or below the slice, the lesion of a healthy slice), else one of another source or one
    the demo data never shows (`UNKNOWN_STRUCTURES`); always one of its own on a slice that shows none of them.
    Answered "The X is not visible in this image.", no code."""
    own = [*sample.source.structures, *WHOLES[sample.source.key]]
    others = sorted({n for src in SOURCES for n in (*src.structures, *WHOLES[src.key])} - set(own))
    missing = [n for n in own if n in sample.absent]
    own_missing = missing and (not sample.masks or rng.random() < OWN_MISSING_P)
    pool = missing if own_missing else others + list(UNKNOWN_STRUCTURES)
    name = pool[rng.integers(len(pool))]
    q = SEG_Q[rng.integers(len(SEG_Q))].format(**_forms(name))
    return q, NOT_VISIBLE_A.format(**_forms(name)), []


def _modality_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    name = sample.source.modality_name
    return MODALITY_Q[rng.integers(len(MODALITY_Q))], f"This is {_article(name)} {name}.", []


def _presence_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """Yes/no about the lesion, the verdict first; a "yes" is grounded with the lesion's code, half the "no"s with
    the organ's (which also teaches the whole organs: brain, lungs).

    The official data writes "Liver segmented as [M0_16]. ... so the answer is no.", and the demo data used to give
    half its "no" answers that form. Then a "no" opened with one of two tokens and a "yes" always with "Yes": an
    unsure model's first token was "Yes", and it called 16 of 18 lesion-free test chest X-rays positive while a
    linear probe of its own image tokens told them apart 9 times in 10.
    """
    site = LESION_SITE[sample.source.key]
    q = f"{PRESENCE_Q} in the {site}?"
    if rng.random() < 0.4:
        q += " Answer yes or no."
    if "lesion" in sample.masks:
        mid = mask_id(sample.sample_id, "lesion")
        return q, f"Yes, there is {LESION_FINDING[sample.source.key]}, segmented as {placeholder(mid)}.", [mid]
    if site in sample.masks and rng.random() < 0.5:
        mid = mask_id(sample.sample_id, site)
        return q, f"No. {_cap(site)} segmented as {placeholder(mid)}; no focal lesion is seen.", [mid]
    return q, f"No, there is no visible lesion in the {site}.", []


def _visible_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]] | None:
    """Is an organ visible? Only asked when the answer is certain (clearly present or no pixel at all).

    When the slice has both kinds, "yes" and "no" are equally likely: with the organs picked uniformly, nine
    answers in ten were "yes" and a model could score 90 % without looking at the image.
    """
    organs = [s for s in sample.source.structures if s != "lesion"]
    shown = [s for s in organs if s in sample.masks]
    missing = [s for s in organs if s in sample.absent]
    pool = missing if missing and (not shown or rng.random() < 0.5) else shown
    if not pool:
        return None
    name = pool[rng.integers(len(pool))]
    q = VISIBLE_Q.format(s=name)
    return q, ("Yes." if name in sample.masks else "No."), []


def _yes_no_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """A closed question: organ visibility or lesion presence, half each (presence when visibility is unsure)."""
    turn = _visible_turn(sample, rng) if rng.random() < 0.5 else None
    return turn if turn is not None else _presence_turn(sample, rng)


def _diagnosis_turn(sample: Sample2D, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    q = DIAG_Q[rng.integers(len(DIAG_Q))]
    if "lesion" in sample.masks:
        mid = mask_id(sample.sample_id, "lesion")
        finding = LESION_FINDING[sample.source.key]
        return q, f"The image shows {finding}, segmented as {placeholder(mid)}.", [mid]
    return q, "No abnormality is seen in this image.", []


def _same_question(question: str) -> str:
    return question.split("?")[0]  # "... in the liver?" and "... in the liver? Answer yes or no." ask the same


def _asks_anew(turns: list[tuple[str, str, list[str]]], turn: tuple[str, str, list[str]] | None) -> bool:
    """``turn`` exists and asks what none of ``turns`` asks already."""
    return turn is not None and _same_question(turn[0]) not in [_same_question(q) for q, _, _ in turns]


#: Share of segmentation conversations that also ask about a structure the slice lacks.
NOT_VISIBLE_P = 0.35


def make_items(sample: Sample2D, image_path: str, mask_paths: dict[str, str], rng: np.random.Generator) -> list[dict]:
    """Two LLaVA-style items per sample: a segmentation one and a VQA one (modality/presence/diagnosis).

    Closed (yes/no) questions are asked often: the VQA item always opens with one and half the segmentation
    items add one. Their answer hangs on a single token that must come from the image, the hardest thing for
    a small language model to learn, so it needs many examples (about 1.7x the uniform mix's count).
    ``image_path`` and ``mask_paths`` (structure -> path) are written as given (relative to the data root).
    """
    if not sample.masks:
        return _items(sample, _empty_slice_turns(sample, rng), mask_paths, image_path)
    present = list(sample.masks)
    parts = [n for n in present if n not in WHOLES[sample.source.key]]  # a whole organ overlaps its parts
    items = []
    # Item 1: segmentation, single structure (a part or a whole organ) or several parts (in a shuffled order so
    # order is learned from text), sometimes with a question about a structure the slice lacks before or after.
    if len(parts) > 1 and rng.random() < 0.4:
        k = int(rng.integers(2, len(parts) + 1))
        names = [parts[i] for i in rng.permutation(len(parts))[:k]]
    else:
        names = [present[rng.integers(len(present))]]
    turns = [_seg_turn(sample, rng, names)]
    if rng.random() < NOT_VISIBLE_P:
        absent = _not_visible_turn(sample, rng)
        turns.insert(int(rng.integers(2)), absent)
    if rng.random() < 0.5:
        turns.append(_yes_no_turn(sample, rng))
    if rng.random() < 0.3:
        turns.append(_modality_turn(sample, rng))
    items.append(turns)
    # Item 2: VQA, a closed question then up to two turns of other kinds.
    turns = [_yes_no_turn(sample, rng)]
    makers = [_modality_turn, _presence_turn, _diagnosis_turn, _visible_turn]
    for i in rng.permutation(len(makers))[: int(rng.integers(0, 3))]:
        t = makers[i](sample, rng)
        if _asks_anew(turns, t):
            turns.append(t)
    items.append(turns)
    return _items(sample, items, mask_paths, image_path)


def _empty_slice_turns(sample: Sample2D, rng: np.random.Generator) -> list[list[tuple[str, str, list[str]]]]:
    """A slice with none of its source's structures (beyond the anatomy): "Segment the X." about one of them is
    answered "not visible", and the closed questions "no". No modality question: a blank slice does not tell."""
    seg = [_not_visible_turn(sample, rng)]
    if rng.random() < 0.5:
        seg.append(_yes_no_turn(sample, rng))
    vqa = [_yes_no_turn(sample, rng)]
    for maker in (_diagnosis_turn, _presence_turn):
        t = maker(sample, rng)
        if rng.random() < 0.5 and _asks_anew(vqa, t):
            vqa.append(t)
    return [seg, vqa]


def _items(sample: Sample2D, items: list[list[tuple[str, str, list[str]]]], mask_paths: dict[str, str],
           image_path: str) -> list[dict]:
    """LLaVA-style items, one per list of (question, answer, mask ids) turns."""
    out = []
    for n, turns in enumerate(items):
        conv, order = [], []
        for j, (q, a, ids) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
            conv.append({"from": "gpt", "value": a})
            order += ids
        used = sorted(set(order), key=order.index)
        files = {m: mask_paths[m] for m in used}
        out.append({
            "id": f"{sample.sample_id}_q{n}",
            "image": image_path,
            "conversations": conv,
            "mask_files": files or None,
            "mask_codes": None,
            "mask_orders": order,
            "modality_label": sample.modality_label,
        })
    return out


WORD = re.compile(r"[a-z]+", re.IGNORECASE)


def words(text: str) -> set[str]:
    """The lower-cased words (letter runs) of a text, region codes and placeholders left out."""
    return {w.lower() for w in WORD.findall(PLACEHOLDER.sub(" ", CODE_TOKEN.sub(" ", text)))}


def answer_vocabulary(items: Sequence[dict]) -> set[str]:
    """Every word of the answers (``gpt`` turns) of LVLM items: an answer with a word outside the training
    answers' vocabulary is garbled (a tiny model misspelling inside a word), whatever else it says."""
    return {w for item in items for turn in item["conversations"] if turn["from"] == "gpt"
            for w in words(turn["value"])}


def placeholder_order(item: dict) -> list[str]:
    """Mask ids in the order their placeholders appear across the whole conversation."""
    return [m for turn in item["conversations"] for m in PLACEHOLDER.findall(turn["value"])]


def fill_codes(items: list[dict], code_for_mask: Callable[[str], str]) -> list[dict]:
    """Copies of ``items`` with every ``{code:<mask_id>}`` replaced by ``[M{m}_{k}]`` and ``mask_codes`` filled.

    ``code_for_mask(mask_id)`` returns ``"M0_16"`` or ``"[M0_16]"``. Raises ValueError on a malformed code or
    when ``mask_orders`` disagrees with the placeholders (the official loader pairs them by position).
    """
    out = []
    for item in items:
        new = copy.deepcopy(item)
        order = placeholder_order(item)
        if order != list(item.get("mask_orders") or []):
            raise ValueError(f"item {item.get('id')}: mask_orders {item.get('mask_orders')} != placeholders {order}")
        codes: dict[str, str] = {}
        for m in order:
            if m not in codes:
                match = CODE.match(str(code_for_mask(m)).strip())
                if match is None:
                    raise ValueError(f"code for mask {m!r} is {code_for_mask(m)!r}, expected M<m>_<k>")
                codes[m] = match.group(1)
        def token(mt: re.Match, table: dict[str, str] = codes) -> str:
            return f"[{table[mt.group(1)]}]"

        for turn in new["conversations"]:
            turn["value"] = PLACEHOLDER.sub(token, turn["value"])
        new["mask_codes"] = codes or None
        out.append(new)
    return out


def closed_kind(question: str) -> str | None:
    """"presence" or "visible" for the two closed (yes/no) question kinds, else None."""
    q = question.split("\n")[-1].strip()
    if q.startswith(PRESENCE_Q):
        return "presence"
    head, tail = VISIBLE_Q.split("{s}")
    if q.startswith(head) and q.endswith(tail):
        return "visible"
    return None


def _answers(item: dict, kind: str) -> list[str]:
    conv = item["conversations"]
    return [a["value"] for q, a in zip(conv[::2], conv[1::2], strict=False) if closed_kind(q["value"]) == kind]


#: At most this many repeats of one conversation: brain MRI has 14 "no, not visible" conversations for 1100 "yes"
#: ones, and repeating those 14 eighty times would teach them by heart, not the question.
MAX_REPEATS = 3


def balance_closed_answers(items: list[dict], kinds: Sequence[str] = ("presence", "visible")) -> list[dict]:
    """``items`` plus repeats of conversations with the rarer answer, so that per modality and question kind
    "yes" is about as frequent as "no" (brain MRI has ~4 lesion-free slices per lesion slice; most CT slices show
    every organ, so "is the ... visible?" is "yes" 3 times in 4).

    A demo training choice, not the official recipe: with 1 "yes" in 4 the small language model learned to
    answer "no" and not to look for the lesion. Counted per conversation (those answering one kind both ways are
    left out of the count); at most `MAX_REPEATS` per conversation, with ids ending in ``_<p|v><n>``. Kinds are
    balanced in turn, each counting the repeats already added.
    """
    out = list(items)
    for kind in kinds:
        by_label: dict[int, list[dict]] = {}
        for item in out:
            by_label.setdefault(item["modality_label"], []).append(item)
        for group in by_label.values():
            verdicts = [(it, {a.startswith("Yes") for a in _answers(it, kind)}) for it in group]
            yes = [it for it, v in verdicts if v == {True}]
            no = [it for it, v in verdicts if v == {False}]
            rare, common = (yes, no) if len(yes) < len(no) else (no, yes)
            repeats = min(MAX_REPEATS, round(len(common) / len(rare)) - 1) if rare else 0
            out += [{**copy.deepcopy(it), "id": f"{it['id']}_{kind[0]}{n}"} for n in range(1, repeats + 1)
                    for it in rare]
    return out


def closed_question_items(items: list[dict]) -> list[dict]:
    """Copies of ``items`` cut down to their closed (yes/no) turns; conversations without one are dropped.

    For a short final phase of stage 5 (a demo choice): the same image with only the questions whose single
    verdict token must come from the image. ``mask_orders``, ``mask_files`` and ``mask_codes`` keep the masks of
    the kept answers (a "yes" is grounded with its code). Works on coded and on placeholder items; ids end in
    ``_closed``.
    """
    out = []
    for item in items:
        conv, order = item["conversations"], list(item.get("mask_orders") or [])
        kept: list[dict] = []
        kept_order: list[str] = []
        pos = 0
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            n = len(CODE_TOKEN.findall(a["value"])) + len(PLACEHOLDER.findall(a["value"]))
            ids, pos = order[pos:pos + n], pos + n
            if closed_kind(q["value"]) is None:
                continue
            question = q["value"].removeprefix("<image>\n")
            kept += [{**q, "value": ("" if kept else "<image>\n") + question}, dict(a)]
            kept_order += ids
        if pos != len(order):
            raise ValueError(f"item {item.get('id')}: {len(order)} mask_orders for {pos} codes in the answers")
        if not kept:
            continue
        used = list(dict.fromkeys(kept_order))
        files, codes = item.get("mask_files") or {}, item.get("mask_codes") or {}
        out.append({
            **copy.deepcopy(item),
            "id": f"{item['id']}_closed",
            "conversations": kept,
            "mask_orders": kept_order,
            "mask_files": {m: files[m] for m in used} or None,
            "mask_codes": ({m: codes[m] for m in used} or None) if item.get("mask_codes") else None,
        })
    return out
