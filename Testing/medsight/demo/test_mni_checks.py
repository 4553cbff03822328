"""The demo model's checks on a volume outside its data (`medsight.demo.mni_checks`), on small inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medsight import Engine
from medsight.config import tiny_config
from medsight.demo.mni_checks import (
    BRAIN_SLICE_FRACTION,
    brain_dice,
    mni_markdown,
    readme_volumes,
    unknown_word_sweep,
)
from medsight.demo.qa import words
from medsight.imaging import Volume, extract_slice, slice_count
from medsight.model.loading import build_model


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(build_model(tiny_config(), seed=0))  # random weights: its answers are byte soup


@pytest.fixture(scope="module")
def small() -> tuple[Volume, Volume]:
    """A 6 x 7 x 9 MR-like volume (anisotropic voxels) with a blob as its "brain"."""
    rng = np.random.default_rng(0)
    k, j, i = np.meshgrid(np.arange(6), np.arange(7), np.arange(9), indexing="ij")
    blob = ((k - 2.5) / 2.2) ** 2 + ((j - 3) / 3) ** 2 + ((i - 4) / 4) ** 2 <= 1  # not on the end slices
    t1 = (blob * 400 + rng.normal(0, 20, blob.shape)).astype(np.float32)
    geometry = {"spacing": (1.0, 1.2, 2.0), "modality": "MR"}
    return Volume(t1, **geometry), Volume(blob.astype(np.float32), **geometry)


def test_sweep_asks_every_slice_of_every_plane_and_counts_unknown_words(engine, small):
    volume, _ = small
    everything = unknown_word_sweep(engine, volume, vocabulary=set())
    assert {p: v["n"] for p, v in everything["planes"].items()} == {
        p: slice_count(volume, p) for p in ("axial", "coronal", "sagittal")}
    assert everything["n"] == sum(volume.array.shape)
    answers = [a for v in everything["planes"].values() for a in v["answers"]]
    found = sorted(set().union(*(words(a) for a in answers)))
    assert found, "the untrained model wrote no word at all"
    # With half of the words known, exactly the answers using one of the other half count.
    known = set(found[::2])
    half = unknown_word_sweep(engine, volume, vocabulary=known, planes=("axial",))
    expected = sum(bool(words(a) - known) for a in everything["planes"]["axial"]["answers"])
    assert half["with_unknown"] == half["planes"]["axial"]["with_unknown"] == expected
    assert half["share"] == pytest.approx(expected / slice_count(volume, "axial"))
    # Every word known: nothing counts.
    assert unknown_word_sweep(engine, volume, vocabulary=set(found), planes=("axial",))["with_unknown"] == 0


def test_brain_dice_on_the_axial_slices_through_the_mask(engine, small):
    volume, mask = small
    out = brain_dice(engine, volume, mask)
    areas = [extract_slice(mask, "axial", k).take(mask.array > 0.5).sum() for k in range(slice_count(mask, "axial"))]
    expected = [k for k, a in enumerate(areas) if a >= BRAIN_SLICE_FRACTION * max(areas)]
    assert out["slices"] == expected and out["n"] == len(expected) < len(areas)
    assert all(0.0 <= d <= 1.0 for d in out["dice_per_slice"])
    assert out["dice_mean"] == pytest.approx(np.mean(out["dice_per_slice"]))
    assert out["answers_without_mask"] <= out["n"]
    with pytest.raises(ValueError, match="brain mask shape"):
        brain_dice(engine, volume, Volume(mask.array[:-1]))
    text = mni_markdown({"white_matter": unknown_word_sweep(engine, volume, set(), planes=("axial",)),
                         "brain": out})
    assert "| axial | 6 |" in text and "mean Dice" in text


def test_readme_volumes_are_the_mni152_template_and_its_brain_mask(tmp_path):
    pytest.importorskip("nilearn")
    t1, mask = readme_volumes(tmp_path)
    assert t1.array.shape == mask.array.shape
    counts = {p: slice_count(t1, p) for p in ("axial", "coronal", "sagittal")}
    assert sorted(counts.values()) == sorted(t1.array.shape)
    brain = mask.array > 0.5
    assert 0.2 < brain.mean() < 0.5  # the brain fills a fair part of the template's box
    assert float(np.mean(t1.array[brain])) > 2 * float(np.mean(t1.array[~brain]))
