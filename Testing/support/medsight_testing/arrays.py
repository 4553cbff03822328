"""Small array helpers shared by tests."""

from __future__ import annotations

import io

import numpy as np


def npy(array: np.ndarray) -> bytes:
    """NPY bytes of an array, as the Slicer client uploads it."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
