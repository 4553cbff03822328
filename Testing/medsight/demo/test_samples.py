"""Tests of the demo's 2D sample rules: which lesions are conspicuous enough to be labelled."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.demo.build import DemoSize, generate_samples
from medsight.demo.catalog import CXR
from medsight.demo.samples import MIN_LESION_CONTRAST, _finish, lesion_contrast

SIZE = 112


def _image_with_disk(step: float, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A noisy grey square (mean 100, sd 5) with lungs and a disk ``step`` grey levels brighter in the left lung."""
    rng = np.random.default_rng(seed)
    grey = rng.normal(100, 5, (SIZE, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disk = (yy - 56) ** 2 + (xx - 30) ** 2 <= 7**2
    grey[disk] += step
    rgb = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    masks = {"right lung": xx < 50, "left lung": xx > 62, "heart": (xx >= 50) & (xx <= 62) & (yy > 40),
             "lesion": disk}
    return rgb, masks


def test_lesion_contrast_is_the_step_in_ring_standard_deviations():
    for step in (3.0, 20.0):
        rgb, masks = _image_with_disk(step)
        assert lesion_contrast(rgb, masks["lesion"]) == pytest.approx(step / 5, rel=0.25)
    rgb, masks = _image_with_disk(-20.0)  # darker counts the same as brighter
    assert lesion_contrast(rgb, masks["lesion"]) == pytest.approx(4, rel=0.25)
    assert lesion_contrast(rgb, np.zeros((SIZE, SIZE), bool)) == 0.0


def test_faint_lesion_slice_is_left_out_and_a_clear_one_kept():
    faint = _finish("a", CXR, "s", "train", *_image_with_disk(3.0), size=SIZE, info={})
    clear = _finish("b", CXR, "s", "train", *_image_with_disk(20.0), size=SIZE, info={})
    assert faint is None
    assert clear is not None and clear.masks["lesion"].sum() > 100
    no_lesion = _image_with_disk(0.0)
    no_lesion[1]["lesion"][:] = False
    kept = _finish("c", CXR, "s", "train", *no_lesion, size=SIZE, info={})
    assert kept is not None and "lesion" in kept.absent


def test_every_labelled_lesion_stands_out():
    counts = {"ct_abdomen": 6, "mri_brain": 6, "cxr": 16}
    spec = DemoSize(subjects={k: {"train": n, "val": 0, "test": 0} for k, n in counts.items()},
                    slices_per_subject={"ct_abdomen": 4, "mri_brain": 4, "cxr": 1}, image_size=SIZE)
    samples = generate_samples(spec, seed=0)
    with_lesion = [s for s in samples if "lesion" in s.masks]
    assert {s.source.key for s in with_lesion} == {"ct_abdomen", "mri_brain", "cxr"}
    assert min(lesion_contrast(s.image, s.masks["lesion"]) for s in with_lesion) >= MIN_LESION_CONTRAST


def test_volume_subjects_also_give_slices_beyond_their_anatomy():
    """Some volume subjects add a slice with none of their structures (a blank slice above the brain): kept with
    every structure absent, so the model learns "not visible" there instead of seeing a blank slice first in use."""
    spec = DemoSize(subjects={"ct_abdomen": {"train": 0, "val": 0, "test": 0},
                              "mri_brain": {"train": 8, "val": 0, "test": 0}, "cxr": {"train": 0, "val": 0, "test": 0}},
                    slices_per_subject={"ct_abdomen": 4, "mri_brain": 4, "cxr": 1}, image_size=SIZE)
    samples = generate_samples(spec, seed=0)
    empty = [s for s in samples if not s.masks]
    assert 0 < len(empty) < len(samples) / 2
    for s in empty:
        assert set(s.source.structures) <= set(s.absent)
    # The other slices keep the sample rule: each shows at least one structure.
    assert all(s.masks for s in samples if s not in empty)
