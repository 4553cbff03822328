"""Tests of the demo question/answer mix: closed questions are frequent, correct and not lopsided."""

from __future__ import annotations

import numpy as np

from medsight.demo.catalog import CT_ABDOMEN
from medsight.demo.qa import balance_lesion_presence, make_items, mask_id
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
                    # Presence "no" answers may first segment the organ ("Liver segmented as ... so ... no.").
                    said_yes = answer.startswith("Yes")
                    assert said_yes == _expected(sample, question), (question, answer)
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
    balanced = balance_lesion_presence(items)
    yes_b, no_b = _presence_counts(balanced)
    assert no_b == no and 0.75 < yes_b / no_b < 1.25
    assert len({it["id"] for it in balanced}) == len(balanced)  # repeats get their own ids
    repeats = balanced[len(items):]
    assert repeats and all(any(PRESENCE in q and a.startswith("Yes") for q, a in _turns(it)) for it in repeats)
    assert balanced[: len(items)] == items  # the originals are untouched
