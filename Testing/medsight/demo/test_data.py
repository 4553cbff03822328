"""Tests of the demo data builder: sources, writers, splits, placeholders and determinism."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.demo import (
    CLASS_IDS,
    SOURCES,
    SPLITS,
    STRUCTURES,
    build_demo_data,
    fill_codes,
    load_mni,
    make_brain_subject,
    make_ct_phantom,
    make_cxr,
    placeholder_order,
)
from medsight.demo.build import SIZES, DemoSize, generate_samples

pytest.importorskip("nilearn")

CODE_TOKEN = re.compile(r"\[(M\d+_\d+)\]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    return build_demo_data(out, size="tiny", seed=0)


def _load(p: Path):
    return json.loads(p.read_text(encoding="utf-8"))


def test_tiny_build_is_small(tiny):
    ds = tiny
    total = sum(ds.counts[sp]["images"] for sp in SPLITS)
    assert 0 < total <= 30
    for sp in SPLITS:  # every source is represented in every split
        assert all(ds.counts[sp]["sources"][s.key]["images"] > 0 for s in SOURCES)


def test_stage1_files_and_fields(tiny):
    ds = tiny
    for sp in SPLITS:
        meta = _load(ds.meta[sp])
        assert meta["modality_labels"] == [s.modality_label for s in SOURCES]
        n = len(meta["roots"])
        assert len(meta["mask_roots"]) == len(meta["json_paths"]) == n
        for root, mroot, jp in zip(meta["roots"], meta["mask_roots"], meta["json_paths"], strict=True):
            doc = _load(ds.root / jp)
            assert [c["name"] for c in doc["categories"]] == list(STRUCTURES)
            images = {im["id"]: im for im in doc["images"]}
            assert images and doc["annotations"]
            for ann in doc["annotations"]:
                assert {"image_id", "file_name", "mask_file", "category_id", "sentences", "bbox"} <= set(ann)
                assert ann["image_id"] in images and images[ann["image_id"]]["file_name"] == ann["file_name"]
                assert 0 <= ann["category_id"] < len(STRUCTURES)
                assert ann["sentences"] and all(isinstance(s["sent"], str) and s["sent"] for s in ann["sentences"])
                assert ann["sentences"][0]["sent"] == STRUCTURES[ann["category_id"]]
                img = np.asarray(Image.open(ds.root / root / ann["file_name"]))
                mask = np.asarray(Image.open(ds.root / mroot / ann["mask_file"]))
                assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
                assert mask.shape == img.shape[:2]
                assert set(np.unique(mask)) <= {0, 255}
                on = mask > 127
                assert on.sum() == ann["area"] > 0
                # Masks lie on the imaged content, not on the black padding / air around it.
                assert img[on].mean() > 5


def test_lvlm_json_format(tiny):
    ds = tiny
    for sp in SPLITS:
        items = _load(ds.lvlm_json[sp])
        assert items
        for it in items:
            assert {"id", "image", "conversations", "mask_files", "mask_codes", "mask_orders"} <= set(it)
            assert (ds.root / it["image"]).is_file()
            conv = it["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert placeholder_order(it) == it["mask_orders"]
            assert set(it["mask_orders"]) == set(it["mask_files"] or {})
            for path in (it["mask_files"] or {}).values():
                assert (ds.root / path).is_file()


def test_splits_disjoint_by_subject(tiny):
    ds = tiny
    subjects = {}
    for s in SOURCES:
        for sp in SPLITS:
            images = _load(ds.stage1_json[s.key][sp])["images"]
            subjects[sp] = subjects.get(sp, set()) | {im["subject"] for im in images}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    images = {sp: {it["image"] for it in _load(ds.lvlm_json[sp])} for sp in SPLITS}
    assert not images["train"] & (images["val"] | images["test"])


def test_fill_codes(tiny):
    ds = tiny
    items = _load(ds.lvlm_json["train"])
    codes = {}

    def code_for(mid: str) -> str:  # a stand-in for the stage-2 quantizer: deterministic per mask
        codes.setdefault(mid, f"M{len(codes) % 3}_{len(codes) % 32}")
        return codes[mid] if len(codes) % 2 else f"[{codes[mid]}]"

    filled = fill_codes(items, code_for)
    assert any(it["mask_orders"] for it in filled)
    for before, it in zip(items, filled, strict=True):
        text = " ".join(t["value"] for t in it["conversations"])
        assert "{code:" not in text
        found = CODE_TOKEN.findall(text)
        assert found == [it["mask_codes"][m] for m in it["mask_orders"]]
        assert len(found) == len(it["mask_orders"])
        assert before["mask_codes"] is None  # the input is not modified
    bad = [dict(items[0], mask_orders=["nope"])]
    with pytest.raises(ValueError):
        fill_codes(bad, code_for)
    seg = next(it for it in items if it["mask_orders"])
    with pytest.raises(ValueError):
        fill_codes([seg], lambda m: "liver")


def test_ct_phantom_hounsfield_ranges():
    from scipy import ndimage

    for seed in range(3):
        ph = make_ct_phantom(np.random.default_rng(seed))
        v, m = ph.volume.array, ph.masks
        assert ph.volume.modality == "CT"
        assert abs(v[m["liver"] & ~m["lesion"]].mean() - 60) < 15
        spleen_core = ndimage.binary_erosion(m["spleen"], iterations=2)  # the rim is blurred with the fat around
        assert abs(v[spleen_core].mean() - 50) < 15
        # Perivisceral fat outlines spleen and kidneys (40 HU soft tissue around them left the spleen invisible).
        for organ in ("spleen", "left kidney", "right kidney"):
            ring = ndimage.binary_dilation(m[organ], iterations=2) & ~m[organ] & ~m["liver"]
            for other in ("spleen", "left kidney", "right kidney"):
                ring &= ~m[other]
            assert v[ring].mean() < -20, organ
        for side in ("left kidney", "right kidney"):
            assert 80 < v[m[side]].mean() < 170  # enhancing cortex ~150 around a ~30 HU sinus
        if m["lesion"].any():
            assert abs(v[m["lesion"]].mean() - 20) < 15
            assert not (m["lesion"] & ~m["liver"]).any()
        assert v.min() < -900 and v[v > 500].size > 0  # air outside, bone in the spine
        assert np.median(v[0, :3, :3]) < -900
        for a in ("liver", "spleen", "left kidney", "right kidney"):
            for b in ("liver", "spleen", "left kidney", "right kidney"):
                assert a == b or not (m[a] & m[b]).any()


def test_brain_masks_inside_mni_brain():
    t = load_mni(2)
    brain = np.ascontiguousarray(t.brain.transpose(2, 1, 0))
    from scipy import ndimage

    near = ndimage.binary_dilation(brain, iterations=3)  # the subject is a slightly warped template
    ph = make_brain_subject(np.random.default_rng(3), t, lesion_p=1.0)
    assert ph.volume.shape == brain.shape and ph.volume.modality == "MR"
    for name in ("grey matter", "white matter", "lesion"):
        m = ph.masks[name]
        assert m.sum() > 0
        assert (m & near).sum() / m.sum() > 0.95
    gm, wm = ph.masks["grey matter"], ph.masks["white matter"]
    assert not (gm & wm).any()
    assert (gm | wm).sum() / brain.sum() > 0.5
    a = ph.volume.array  # T1: white matter brighter than grey matter
    assert np.median(a[wm]) > np.median(a[gm])


def test_cxr_masks():
    im = make_cxr(np.random.default_rng(0), size=96, nodule_p=1.0)
    m = im.masks
    assert all(m[k].any() for k in ("right lung", "left lung", "heart", "lesion"))
    assert not (m["heart"] & (m["right lung"] | m["left lung"])).any()
    # PA view: the patient's right lung is on the image left.
    assert np.argwhere(m["right lung"])[:, 1].mean() < np.argwhere(m["left lung"])[:, 1].mean()
    assert np.median(im.pixels[m["right lung"]]) < np.median(im.pixels[m["heart"]])


def test_class_ids_cover_all_structures():
    for s in SOURCES:
        assert all(name in CLASS_IDS for name in s.structures)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_deterministic(tiny, tmp_path):
    ds = tiny
    again = build_demo_data(tmp_path / "b", size="tiny", seed=0)
    assert _digest(ds.root) == _digest(again.root)
    other = build_demo_data(tmp_path / "c", size="tiny", seed=1)
    assert _digest(ds.root) != _digest(other.root)


def test_more_training_subjects_leave_val_and_test_unchanged():
    """Sizes differ only in training subjects ("large" vs "default"), so their scores share one test split."""
    small = SIZES["tiny"]
    bigger = DemoSize({k: {**v, "train": v["train"] + 1} for k, v in small.subjects.items()},
                      small.slices_per_subject, small.image_size)
    a, b = generate_samples(small), generate_samples(bigger)
    held_out = {s.sample_id: s for s in a if s.split != "train"}
    assert held_out and held_out.keys() == {s.sample_id for s in b if s.split != "train"}
    for s in b:
        if s.split != "train":
            assert np.array_equal(s.image, held_out[s.sample_id].image)
            assert s.masks.keys() == held_out[s.sample_id].masks.keys()
    assert sum(s.split == "train" for s in b) > sum(s.split == "train" for s in a)
    large, default = SIZES["large"], SIZES["default"]
    for source, splits in large.subjects.items():
        assert splits["val"] == default.subjects[source]["val"] and splits["test"] == default.subjects[source]["test"]
        assert splits["train"] == 3 * default.subjects[source]["train"]
