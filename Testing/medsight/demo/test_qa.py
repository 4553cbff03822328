"""Tests of the demo question/answer mix: closed questions are frequent, correct and not lopsided."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.demo.catalog import CT_ABDOMEN, WHOLES
from medsight.demo.qa import (
    MAX_REPEATS,
    OWN_MISSING_P,
    PLACEHOLDER,
    balance_closed_answers,
    closed_kind,
    closed_question_items,
    make_items,
    mask_id,
)
from medsight.demo.samples import Sample2D

PRESENCE = "Is there a lesion"
VISIBLE = "visible in this image?"


def _ct_slice(with_lesion: bool) -> Sample2D:
    """A CT slice showing liver and spleen (and a lesion or not); both kidneys have no pixel in it."""
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    masks = {"liver": mask, "spleen": mask} | ({"lesion": mask} if with_lesion else {})
    return Sample2D("ct_x_z001", CT_ABDOMEN, "ct_x", "train", np.zeros((8, 8, 3), np.uint8), masks,
                    absent=("left kidney", "right kidney") + (() if with_lesion else ("lesion",)))


def _items(sample: Sample2D, seed: int) -> list[dict]:
    paths = {mask_id(sample.sample_id, n): f"m/{n}.png" for n in sample.masks}
    return make_items(sample, "img.png", paths, np.random.default_rng(seed))


def _turns(item: dict) -> list[tuple[str, str]]:
    conv = item["conversations"]
    return [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(conv[::2], conv[1::2], strict=True)]


def _named(answer: str) -> str:
    """The structure a "The X is/are ..." answer is about."""
    return answer.removeprefix("The ").split(" is ")[0].split(" are ")[0]


def _expected(sample: Sample2D, question: str) -> bool:
    if PRESENCE in question:
        return "lesion" in sample.masks
    return question.removeprefix("Is the ").removesuffix(" " + VISIBLE) in sample.masks


def test_vqa_item_opens_with_a_closed_question_and_every_verdict_is_right():
    for seed in range(200):
        sample = _ct_slice(seed % 2 == 0)
        items = _items(sample, seed)
        question, _ = _turns(items[1])[0]
        assert PRESENCE in question or VISIBLE in question
        for item in items:
            turns = _turns(item)
            for question, answer in turns:
                if PRESENCE in question or VISIBLE in question:
                    # The verdict is the first word of every closed answer: the token the CE weights.
                    verdict = answer.split(",")[0].split(".")[0]
                    assert verdict in ("Yes", "No"), (question, answer)
                    assert (verdict == "Yes") == _expected(sample, question), (question, answer)
            questions = [q.split("?")[0] for q, _ in turns]
            assert len(questions) == len(set(questions)), "an item asks the same question twice"


def test_closed_questions_are_frequent_and_visibility_is_balanced():
    closed = visible = visible_no = 0
    for seed in range(400):
        for item in _items(_ct_slice(seed % 2 == 0), seed):
            for question, answer in _turns(item):
                closed += PRESENCE in question or VISIBLE in question
                if VISIBLE in question:
                    visible += 1
                    visible_no += answer == "No."
    assert closed / 400 >= 1.4  # the uniform mix asked about one per image
    # Two organs shown and two absent: "no" must be about as frequent as "yes", not one in ten.
    assert 0.4 <= visible_no / visible <= 0.6


def _presence_counts(items: list[dict]) -> tuple[int, int]:
    answers = [a for it in items for q, a in _turns(it) if PRESENCE in q]
    return sum(a.startswith("Yes") for a in answers), sum(not a.startswith("Yes") for a in answers)


def test_balancing_repeats_lesion_items_until_yes_matches_no():
    items = [it for seed in range(60) for lesion in (True, False, False, False)
             for it in _items(_ct_slice(lesion), seed)]
    items = [{**it, "id": f"{it['id']}_{n}"} for n, it in enumerate(items)]
    yes, no = _presence_counts(items)
    assert no > 2.5 * yes  # lesion slices are a minority, as in the brain MRI data
    balanced = balance_closed_answers(items, kinds=("presence",))
    yes_b, no_b = _presence_counts(balanced)
    assert no_b == no and 0.75 < yes_b / no_b < 1.25
    assert len({it["id"] for it in balanced}) == len(balanced)  # repeats get their own ids
    repeats = balanced[len(items):]
    assert repeats and all(any(PRESENCE in q and a.startswith("Yes") for q, a in _turns(it)) for it in repeats)
    assert balanced[: len(items)] == items  # the originals are untouched


def _visible_counts(items: list[dict]) -> tuple[int, int]:
    verdicts = [{a == "Yes." for q, a in _turns(it) if VISIBLE in q} for it in items]
    return sum(v == {True} for v in verdicts), sum(v == {False} for v in verdicts)


def _full_ct_slice(seed: int) -> Sample2D:
    """Every organ shown, or every organ but one kidney: "visible?" is mostly "yes"."""
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    names = ["liver", "spleen", "left kidney", "right kidney"][: 3 if seed % 2 == 0 else 4]
    return Sample2D(f"ct_{seed}_z001", CT_ABDOMEN, f"ct_{seed}", "train", np.zeros((8, 8, 3), np.uint8),
                    dict.fromkeys(names, mask), absent=("lesion",) + (("right kidney",) if len(names) == 3 else ()))


def test_balancing_repeats_the_rarer_visibility_answer_too():
    items = [it for seed in range(200) for it in _items(_full_ct_slice(seed), seed)]
    yes, no = _visible_counts(items)
    assert yes > 3 * no > 0
    balanced = balance_closed_answers(items)
    yes_b, no_b = _visible_counts(balanced)
    assert yes_b == yes and 0.75 < no_b / yes_b < 1.25
    assert len({it["id"] for it in balanced}) == len(balanced)
    assert balance_closed_answers(items, kinds=("presence",)) == items  # no lesion anywhere: nothing to balance


def test_balancing_repeats_a_conversation_at_most_max_repeats_times():
    # All organs shown on 100 slices, one kidney missing on the first slice whose conversations ask about it.
    lacking = next(its for seed in range(0, 200, 2) if _visible_counts(its := _items(_full_ct_slice(seed), seed))[1])
    items = [it for seed in range(1, 200, 2) for it in _items(_full_ct_slice(seed), seed)] + lacking
    _, no = _visible_counts(items)
    assert 0 < no <= 2  # one slice lacks a kidney: far too few "no" to balance by repeating
    balanced = balance_closed_answers(items, kinds=("visible",))
    assert len(balanced) - len(items) == MAX_REPEATS * no


def test_closed_question_items_keep_only_yes_no_turns_with_their_masks():
    items = [{**it, "id": f"{it['id']}_{seed}"} for seed in range(40) for it in _items(_ct_slice(seed % 2 == 0), seed)]
    cut = closed_question_items(items)
    by_id = {it["id"]: it for it in items}
    assert cut and len(cut) <= len(items)
    for item in cut:
        original = by_id[item["id"].removesuffix("_closed")]
        turns = _turns(item)
        assert turns and all(closed_kind(q) for q, _ in turns)
        # Same questions and answers, in the same order, as the original's closed turns.
        assert turns == [(q, a) for q, a in _turns(original) if closed_kind(q)]
        conv = item["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
        # Masks: those of the kept answers' placeholders, in order, with their files.
        order = [m for t in conv for m in PLACEHOLDER.findall(t["value"])]
        assert item["mask_orders"] == order
        assert set(item["mask_files"] or {}) == set(order)
    # Every item with a closed turn has its copy (the VQA item always opens with one).
    assert {it["id"] for it in cut} == {it["id"] + "_closed" for it in items if any(closed_kind(q) for q, _ in
                                                                                    _turns(it))}
    assert sum("_q1" in it["id"] for it in cut) == 40


def test_closed_question_items_reject_masks_that_do_not_match_the_answers():
    item = next(it for seed in range(40) for it in _items(_ct_slice(True), seed) if it["mask_orders"])
    broken = {**item, "mask_orders": item["mask_orders"] + ["extra"]}
    with pytest.raises(ValueError, match="mask_orders"):
        closed_question_items([broken])


def test_a_slice_beyond_the_anatomy_is_answered_not_visible_and_no():
    blank = Sample2D("ct_x_z000", CT_ABDOMEN, "ct_x", "train", np.zeros((8, 8, 3), np.uint8), {},
                     absent=(*CT_ABDOMEN.structures,))
    for seed in range(50):
        items = _items(blank, seed)
        seg_question, seg_answer = _turns(items[0])[0]
        named = _named(seg_answer)
        assert seg_answer.endswith("not visible in this image.") and named in seg_question
        assert named in (*CT_ABDOMEN.structures, *WHOLES[CT_ABDOMEN.key])  # one of its own source's structures
        for item in items:
            assert item["mask_orders"] == [] and not PLACEHOLDER.search(str(item["conversations"]))
            for question, answer in _turns(item):
                assert "modality" not in question and "kind of scan" not in question  # a blank slice cannot tell
                if PRESENCE in question or VISIBLE in question:
                    assert answer.startswith("No"), (question, answer)


def test_not_visible_questions_ask_about_the_slices_own_missing_organs_at_the_set_share():
    sample = _ct_slice(False)
    own = {*CT_ABDOMEN.structures, *WHOLES[CT_ABDOMEN.key]}
    named = [_named(answer) for seed in range(600) for item in _items(sample, seed) for _, answer in _turns(item)
             if answer.endswith("not visible in this image.")]
    share = np.mean([name in own for name in named])
    assert len(named) > 100  # enough for a binomial standard error of at most 0.05
    assert abs(share - OWN_MISSING_P) < 0.1, share
    assert {name for name in named if name in own} <= set(sample.absent)
