"""Overlay PNGs: the slice with each region's mask drawn in its own colour and outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medsight.answer import Region

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_overlay(image: np.ndarray, regions: list[Region], alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W, 3) image with the regions' masks blended in and their borders drawn opaque."""
    out = np.asarray(image, dtype=np.float64).copy()
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    for region in regions:
        colour = np.array(PALETTE[region.index % len(PALETTE)], dtype=np.float64)
        mask = region.mask
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        border = mask & ~ndimage.binary_erosion(mask)
        out[border] = colour
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, regions: list[Region]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_overlay(image, regions)).save(path)
    return path
