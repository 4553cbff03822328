"""Decoding of the run-length encoded masks that the MedSIGHT engine sends.

Wire format: ``{"shape": [H, W], "counts": [...]}``. The mask is flattened in row-major (C) order and
``counts`` holds the lengths of alternating runs of False and True pixels, always starting with a False run
(which is 0 long when the first pixel is set). The counts add up to H * W.

Standard library and numpy only: this module runs inside 3D Slicer's Python.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["decode_mask"]


def _shape_of(rle: dict) -> tuple[int, ...]:
    shape = rle.get("shape")
    if not isinstance(shape, (list, tuple)) or not shape:
        raise ValueError(f"RLE mask needs a non-empty 'shape' list, got {shape!r}")
    dims = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise ValueError(f"RLE mask shape must hold non-negative integers, got {list(shape)!r}")
        dims.append(int(s))
    return tuple(dims)


def _counts_of(rle: dict) -> np.ndarray:
    counts = rle.get("counts")
    if not isinstance(counts, (list, tuple, np.ndarray)):
        raise ValueError(f"RLE mask needs a 'counts' list, got {type(counts).__name__}")
    for c in counts:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Integral):
            raise ValueError(f"RLE counts must be integers, found {c!r}")
    array = np.asarray(counts, dtype=np.int64).reshape(-1)
    if array.size and array.min() < 0:
        raise ValueError(f"RLE counts must be non-negative, found {int(array.min())}")
    return array


def decode_mask(rle: dict) -> np.ndarray:
    """Turn ``{"shape": [H, W], "counts": [...]}`` into a boolean numpy array of that shape.

    Raises:
        ValueError: the dict lacks ``shape``/``counts``, a value is not a non-negative integer, or the counts do
            not add up to the number of pixels.
    """
    if not isinstance(rle, dict):
        raise ValueError(f"an RLE mask is a dict with 'shape' and 'counts', got {type(rle).__name__}")
    shape = _shape_of(rle)
    counts = _counts_of(rle)
    expected = int(np.prod(shape, dtype=np.int64))
    total = int(counts.sum())
    if total != expected:
        raise ValueError(
            f"RLE counts add up to {total} pixels but shape {list(shape)} has {expected}; the mask is corrupt"
        )
    # Run r is False for even r, True for odd r.
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts).reshape(shape)
