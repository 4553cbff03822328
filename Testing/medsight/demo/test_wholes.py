"""Whole organs (brain, lungs, kidneys) as unions of their parts, and "... is not visible in this image." answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.demo import SOURCES, STRUCTURES, Sample2D
from medsight.demo.catalog import CLASS_IDS, CT_ABDOMEN, UNKNOWN_STRUCTURES, WHOLES
from medsight.demo.qa import NOT_VISIBLE, _not_visible_turn, make_items
from medsight.demo.samples import add_wholes


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_wholes_have_class_ids_after_the_parts():
    assert STRUCTURES[:10] == ("liver", "spleen", "left kidney", "right kidney", "lesion", "grey matter",
                               "white matter", "right lung", "left lung", "heart")
    for s in SOURCES:
        for whole, parts in WHOLES[s.key].items():
            assert CLASS_IDS[whole] >= 10 and set(parts) <= set(s.structures)


def test_builder_writes_each_whole_as_the_union_of_its_parts(tiny_demo):
    root = Path(tiny_demo.root)
    checked = {}
    for s in SOURCES:
        for split in ("train", "val", "test"):
            doc = json.loads((root / s.key / f"{split}.json").read_text())
            by_image: dict[int, dict[str, np.ndarray]] = {}
            for ann in doc["annotations"]:
                mask = np.asarray(Image.open(root / s.key / "masks" / ann["mask_file"])) > 127
                by_image.setdefault(ann["image_id"], {})[STRUCTURES[ann["category_id"]]] = mask
            for masks in by_image.values():
                for whole, parts in WHOLES[s.key].items():
                    shown = [masks[p] for p in parts if p in masks]
                    assert (whole in masks) == bool(shown)
                    if shown:
                        union = np.logical_or.reduce(shown)
                        assert _dice(masks[whole], union) == 1.0
                        assert masks[whole].sum() >= max(m.sum() for m in shown)
                        checked[whole] = checked.get(whole, 0) + 1
    # Every brain slice and every chest X-ray has its whole organ; some CT slices show a kidney.
    assert set(checked) == {"brain", "lungs", "kidneys"}


def test_a_whole_is_absent_only_when_every_part_is():
    left = np.zeros((8, 8), bool)
    left[2:4, 2:4] = True
    masks, absent = {"liver": left.copy(), "left kidney": left}, ["spleen", "right kidney"]
    add_wholes(CT_ABDOMEN, masks, absent)
    assert _dice(masks["kidneys"], left) == 1.0 and "kidneys" not in absent
    masks, absent = {"liver": left.copy()}, ["spleen", "left kidney", "right kidney"]
    add_wholes(CT_ABDOMEN, masks, absent)
    assert "kidneys" not in masks and "kidneys" in absent


def _sample(masks: dict[str, np.ndarray], absent: tuple[str, ...]) -> Sample2D:
    return Sample2D("ct_abdomen_train000_z001", CT_ABDOMEN, "ct_abdomen_train000", "train",
                    np.zeros((8, 8, 3), np.uint8), masks, absent)


def test_questions_about_missing_structures_are_answered_not_visible():
    organ = np.zeros((8, 8), bool)
    organ[1:5, 1:5] = True
    sample = _sample({"liver": organ}, ("spleen", "left kidney", "right kidney", "lesion", "kidneys"))
    named = {}
    for seed in range(300):
        q, a, ids = _not_visible_turn(sample, np.random.default_rng(seed))
        assert ids == [] and a.endswith(NOT_VISIBLE + ".")
        name = a.removeprefix("The ").split(" is not ")[0].split(" are not ")[0]
        assert name in q
        named[name] = a
    assert "liver" not in named  # shown in the slice
    assert named["kidneys"] == "The kidneys are not visible in this image."
    assert named["spleen"] == "The spleen is not visible in this image."
    assert {"brain", "heart", "white matter"} <= set(named) and set(UNKNOWN_STRUCTURES) <= set(named)


def test_items_ask_for_wholes_and_missing_structures(tiny_demo):
    items = [it for path in tiny_demo.lvlm_json.values() for it in json.loads(path.read_text())]
    answers = [t["value"] for it in items for t in it["conversations"] if t["from"] == "gpt"]
    assert any("not visible in this image" in a for a in answers)
    for whole in ("brain", "lungs"):  # every brain slice and radiograph has one (kidneys: below)
        assert any(f"_{whole}}}" in a for a in answers), whole
    # Whole organs are never listed with their own parts (they overlap).
    organ = np.ones((8, 8), bool)
    sample = _sample({"liver": organ, "left kidney": organ, "right kidney": organ, "kidneys": organ}, ("lesion",))
    asked = 0
    for seed in range(100):
        for item in make_items(sample, "x.png", {f"{sample.sample_id}_{n.replace(' ', '_')}": "m.png" for n in
                                                   sample.masks}, np.random.default_rng(seed)):
            order = item["mask_orders"]
            asked += order == [f"{sample.sample_id}_kidneys"]
            if len(set(order)) > 1:
                assert not ("kidneys" in " ".join(order) and "kidney" in " ".join(o for o in order
                                                                                 if "kidneys" not in o))
    assert asked >= 10  # about one single-structure question in four is about the whole


if __name__ == "__main__":
    pytest.main([__file__])
