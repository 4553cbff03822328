"""Mapping an RGB image to the model input, with the exact inverse for masks.

Two modes:
- ``"crop"``: the official UniMed-CLIP validation transform (bicubic resize of the shorter side to S, centre
  crop to S x S). Non-square images lose their borders; pixels outside the crop get no mask.
- ``"letterbox"``: bicubic resize of the longer side to S, centred on a black S x S canvas. Nothing is cut, so
  it is the default for non-square slices; for square images both modes are identical.

Coordinates are continuous pixel coordinates with pixel i covering [i, i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ResizeMode = Literal["crop", "letterbox"]

# Logit given to source pixels the model never saw (cut off by the centre crop).
UNSEEN_LOGIT = -1e4


@dataclass(frozen=True)
class InputTransform:
    """Affine map between source pixels and model-input pixels: model = source * scale + shift."""

    source_height: int
    source_width: int
    size: int
    scale_y: float
    scale_x: float
    shift_y: float
    shift_x: float
    mode: ResizeMode

    def to_model(self, points_yx: np.ndarray) -> np.ndarray:
        """Map (..., 2) source (y, x) coordinates to model-input coordinates."""
        p = np.asarray(points_yx, dtype=np.float64)
        return np.stack([p[..., 0] * self.scale_y + self.shift_y, p[..., 1] * self.scale_x + self.shift_x], -1)

    def to_source(self, points_yx: np.ndarray) -> np.ndarray:
        """Map (..., 2) model-input (y, x) coordinates back to source coordinates."""
        p = np.asarray(points_yx, dtype=np.float64)
        return np.stack(
            [(p[..., 0] - self.shift_y) / self.scale_y, (p[..., 1] - self.shift_x) / self.scale_x], -1
        )

    def logits_to_source(self, logits: torch.Tensor) -> torch.Tensor:
        """Resample (K, m, m) mask logits over the model input onto the (K, H, W) source grid.

        Bilinear with align_corners=False semantics, so for a square source this equals the official
        ``F.interpolate(logits, (H, W), mode="bilinear")``. Source pixels outside the model's view get
        ``UNSEEN_LOGIT``.
        """
        if logits.ndim != 3:
            raise ValueError(f"expected (K, m, m) mask logits, got shape {tuple(logits.shape)}")
        grid, seen = self._sampling_grid
        out = F.grid_sample(
            logits.unsqueeze(0), grid.to(device=logits.device, dtype=logits.dtype), mode="bilinear",
            padding_mode="border", align_corners=False,
        )[0]
        return out.masked_fill(~seen.to(out.device), UNSEEN_LOGIT)

    @cached_property
    def _sampling_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (1, H, W, 2) `grid_sample` grid of the source pixel centres and the (H, W) mask of the pixels the
        model saw; kept by the transform because every slice of a volume shares one (`Engine` reuses it)."""
        h, w = self.source_height, self.source_width
        ys = (torch.arange(h, dtype=torch.float64) + 0.5) * self.scale_y + self.shift_y
        xs = (torch.arange(w, dtype=torch.float64) + 0.5) * self.scale_x + self.shift_x
        gy = (2 * ys / self.size - 1).view(h, 1).expand(h, w)
        gx = (2 * xs / self.size - 1).view(1, w).expand(h, w)
        seen = ((ys >= 0) & (ys < self.size)).view(h, 1) & ((xs >= 0) & (xs < self.size)).view(1, w)
        return torch.stack([gx, gy], -1).unsqueeze(0), seen


def _resized_shape(height: int, width: int, size: int, mode: ResizeMode) -> tuple[int, int]:
    if mode == "crop":
        # torchvision's rule for an int size: the shorter side becomes `size`, the longer is truncated.
        if width <= height:
            return int(size * height / width), size
        return size, int(size * width / height)
    if mode == "letterbox":
        if width >= height:
            return max(1, round(size * height / width)), size
        return size, max(1, round(size * width / height))
    raise ValueError(f"unknown resize mode {mode!r}; use 'crop' (official) or 'letterbox'")


def prepare_image(
    image: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    mode: ResizeMode = "crop",
) -> tuple[torch.Tensor, InputTransform]:
    """Turn an 8-bit image (H, W), (H, W, 3) or (H, W, 4) into normalised (3, S, S) float32 pixels (an alpha channel
    is dropped, as PIL's ``convert("RGB")`` in the official loader drops it).

    Returns the pixels and the transform that maps masks back onto the image.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got dtype {array.dtype}; window it first")
    # Checked before a grey image gets its colour axis, so the message names the shape the caller gave.
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    height, width = array.shape[:2]
    pil = Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")
    new_h, new_w = _resized_shape(height, width, size, mode)
    resized = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
    if mode == "crop":
        # torchvision's centre crop offsets (Python round: half to even).
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
        canvas = resized[top : top + size, left : left + size]
        shift_y, shift_x = -float(top), -float(left)
    else:
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = resized
        shift_y, shift_x = float(top), float(left)
    pixels = torch.from_numpy(np.array(canvas, copy=True)).permute(2, 0, 1).float().div(255.0)
    pixels = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    transform = InputTransform(
        source_height=height,
        source_width=width,
        size=size,
        scale_y=new_h / height,
        scale_x=new_w / width,
        shift_y=shift_y,
        shift_x=shift_x,
        mode=mode,
    )
    return pixels, transform
