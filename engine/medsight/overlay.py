"""Overlay PNGs: the slice with each region's mask drawn in its finding's colour and outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medsight.answer import Region
from medsight.atomic_files import replace_file
from medsight.imaging.export import make_parent_folder

Colour = tuple[float, float, float]


def draw_overlay(image: np.ndarray, regions: list[Region], colours: list[Colour], alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W, 3) image with the regions' masks blended in and their borders drawn opaque, region k in
    `colours[k]` (RGB 0..1): its finding's segment colour, which the caller gives (regions of one label share it)."""
    if len(colours) != len(regions):
        raise ValueError(f"{len(colours)} colours for {len(regions)} regions")
    out = np.asarray(image, dtype=np.float64).copy()
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    for region, rgb in zip(regions, colours, strict=True):
        colour = 255 * np.array(rgb, dtype=np.float64)
        mask = region.mask
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        border = mask & ~ndimage.binary_erosion(mask)
        out[border] = colour
    return np.rint(out).clip(0, 255).astype(np.uint8)  # rounded, as a 0..1 colour is shown in 8 bits (not cut)


def save_overlay(path: str | Path, image: np.ndarray, regions: list[Region], colours: list[Colour]) -> Path:
    path = Path(path)
    make_parent_folder(path)
    picture = Image.fromarray(draw_overlay(image, regions, colours))
    replace_file(path, lambda target: picture.save(target, format="PNG"))  # a failed write keeps the old file
    return path
