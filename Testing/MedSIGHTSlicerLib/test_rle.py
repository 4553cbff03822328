"""The client's RLE decoder against the engine's encoder."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.server.rle import encode_mask
from MedSIGHTSlicerLib.rle import decode_mask


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(1, 70, size=2))
    mask = rng.random(shape) < rng.uniform(0.05, 0.95)
    decoded = decode_mask(encode_mask(mask))
    assert decoded.dtype == bool
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((4, 5), bool),
        np.ones((4, 5), bool),
        np.eye(6, dtype=bool),  # first pixel set: counts start with a 0-long False run
        np.array([[False, True]]),
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
    ],
    ids=["empty", "full", "diagonal", "last-pixel", "one-false", "one-true"],
)
def test_round_trip_edge_cases(mask):
    np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)


def test_row_major_order_and_leading_false_run():
    mask = decode_mask({"shape": [2, 3], "counts": [0, 2, 3, 1]})
    np.testing.assert_array_equal(mask, [[True, True, False], [False, False, True]])


def test_zero_sized_mask():
    assert decode_mask({"shape": [0, 4], "counts": []}).shape == (0, 4)


@pytest.mark.parametrize(
    ("rle", "words"),
    [
        ({"shape": [2, 2], "counts": [1, 2]}, "add up to 3 pixels but shape [2, 2] has 4"),
        ({"shape": [2, 2], "counts": [2, 2, 1]}, "add up to 5"),
        ({"shape": [2, 2], "counts": [5, -1]}, "non-negative"),
        ({"shape": [2, 2], "counts": [1.5, 2.5]}, "integers"),
        ({"shape": [2, 2], "counts": [True, 3]}, "integers"),
        ({"shape": [2, -2], "counts": []}, "non-negative integers"),
        ({"shape": [], "counts": []}, "non-empty 'shape'"),
        ({"counts": [4]}, "'shape'"),
        ({"shape": [2, 2]}, "'counts'"),
        ([4], "dict"),
    ],
)
def test_bad_rle_raises_a_clear_value_error(rle, words):
    with pytest.raises(ValueError, match=r"RLE|dict") as info:
        decode_mask(rle)
    assert words in str(info.value)
