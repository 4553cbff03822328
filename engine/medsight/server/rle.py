"""Run-length encoding of binary masks: the wire format of masks in the HTTP API, and the engine's only RLE (the
evaluation's prediction files store the same counts). The Slicer client decodes it with its own copy,
`MedSIGHTSlicerLib/rle.py` (it cannot import the engine); `Testing/test_contracts.py` checks they agree.

A mask of shape (H, W) is flattened in row-major (C) order; `counts` alternates run lengths of False and
True, starting with False (so it starts with 0 when the first pixel is set). The counts sum to H * W.
"""

from __future__ import annotations

import numpy as np


def encode_mask(mask: np.ndarray) -> dict:
    """Boolean (H, W) mask -> {"shape": [H, W], "counts": [...]}."""
    flat = np.asarray(mask, dtype=bool).ravel(order="C")
    if flat.size == 0:
        return {"shape": list(mask.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"shape": [int(s) for s in mask.shape], "counts": [int(c) for c in counts]}


def decode_mask(rle: dict) -> np.ndarray:
    """Inverse of `encode_mask`; a ValueError names a corrupt mask."""
    shape = tuple(int(s) for s in rle["shape"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError(f"RLE counts must be non-negative, found {int(counts.min())}")
    if counts.sum() != int(np.prod(shape)):
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {int(np.prod(shape))} for shape {shape}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)
