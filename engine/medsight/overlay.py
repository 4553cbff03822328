"""Overlay PNGs: the slice with each region's mask drawn in its own colour and outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medsight.answer import Region
from medsight.atomic_files import replace_file
from medsight.imaging.export import make_parent_folder
from medsight.naming import colour_for


def draw_overlay(image: np.ndarray, regions: list[Region], alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W, 3) image with the regions' masks blended in and their borders drawn opaque, each in the colour
    the Slicer module gives its segment (`naming.colour_for`)."""
    out = np.asarray(image, dtype=np.float64).copy()
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    used: list[tuple[float, float, float]] = []
    for region in regions:
        used.append(colour_for(region.label or region.code or "Region", avoid=used))
        colour = 255 * np.array(used[-1], dtype=np.float64)
        mask = region.mask
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        border = mask & ~ndimage.binary_erosion(mask)
        out[border] = colour
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, regions: list[Region]) -> Path:
    path = Path(path)
    make_parent_folder(path)
    picture = Image.fromarray(draw_overlay(image, regions))
    replace_file(path, lambda target: picture.save(target, format="PNG"))  # a failed write keeps the old file
    return path
