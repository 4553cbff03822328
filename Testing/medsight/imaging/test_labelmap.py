"""Assembly of slice masks into a labelmap, clean-up and overlap resolution."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.imaging import ImagingError, Segment, SegmentationBuilder, Volume, extract_slice


def _vol() -> Volume:
    return Volume(np.zeros((6, 20, 20), np.int16), spacing=(1, 1, 2))


def test_clean_up_largest_component_and_holes():
    vol = _vol()
    s = extract_slice(vol, "axial", 3)
    mask = np.zeros(s.shape, bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole
    mask[16:18, 16:18] = True  # a speck
    b = SegmentationBuilder(vol)
    b.add(s, mask, Segment(1, "organ"))
    raw = b.build().labelmap
    assert raw.sum() == 100 - 9 + 4
    clean = b.build(largest_component=True, fill_holes=True).labelmap
    assert clean.sum() == 100 and np.array_equal(s.take(clean)[2:12, 2:12], np.ones((10, 10)))


def test_overlap_goes_to_higher_probability_and_is_counted():
    vol = _vol()
    s = extract_slice(vol, "axial", 0)
    a, b_ = np.zeros(s.shape), np.zeros(s.shape)
    a[0:10, 0:10], b_[5:15, 5:15] = 0.9, 0.7
    b = SegmentationBuilder(vol)
    b.add(s, a, Segment(1, "a"))
    b.add(s, b_, Segment(2, "b"))
    seg = b.build(keep_probabilities=True)
    lm = s.take(seg.labelmap)
    assert seg.overlap_voxels == 25 and lm[7, 7] == 1 and lm[12, 12] == 2
    assert seg.probabilities[2].max() == round(0.7 * 255)


def test_builder_refuses_foreign_slices_and_bad_masks(ct_series):
    from medsight.imaging import read_volume

    b = SegmentationBuilder(_vol())
    other = extract_slice(read_volume(ct_series), "axial", 0)
    with pytest.raises(ImagingError, match="does not come from this builder's volume"):
        b.add(other, np.zeros(other.shape, bool), Segment(1, "x"))
    s = extract_slice(_vol(), "axial", 0)
    with pytest.raises(ImagingError, match=r"probabilities in 0\.\.1"):
        b.add(s, np.full(s.shape, 2.0), Segment(1, "x"))
    b.add(s, np.zeros(s.shape, bool), Segment(1, "x"))
    with pytest.raises(ImagingError, match="label 1 is already used by segment 'x'"):
        b.add(s, np.zeros(s.shape, bool), Segment(1, "y"))
