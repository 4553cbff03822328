"""Run-length encoding of binary masks, the wire format of masks in the HTTP API.

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
