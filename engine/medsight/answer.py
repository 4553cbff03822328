"""What the model returns for a question: the answer text and one region per generated code."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Region:
    """One segmented region of an answer.

    Attributes:
        code: the generated token, e.g. "[M0_21]"; None for the official no-code fallback mask.
        label: the phrase naming it in the answer ("" if none was found).
        index: position among the answer's codes (channel k of the decode).
        mask_logits: (m, m) raw logits over the model input (192 x 192 for the full model).
        mask: (H, W) boolean mask on the input image's pixel grid (logit > 0).
        probability: mean sigmoid probability over the mask's pixels (0 for an empty mask).
        bbox: (row0, col0, row1, col1) inclusive bounds of the mask, or None if it is empty.
    """

    code: str | None
    label: str
    index: int
    mask_logits: torch.Tensor
    mask: np.ndarray
    probability: float
    bbox: tuple[int, int, int, int] | None

    @property
    def modality(self) -> int | None:
        return None if self.code is None else int(self.code[2:-1].split("_")[0])


@dataclass
class Answer:
    """The answer to one question about one image."""

    text: str
    regions: list[Region] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False


def region_from_logits(
    code: str | None, label: str, index: int, mask_logits: torch.Tensor, source_logits: torch.Tensor
) -> Region:
    """Build a Region from model-input logits and the same logits mapped onto the source grid."""
    mask = (source_logits > 0).cpu().numpy()
    prob = float(torch.sigmoid(source_logits.float())[torch.from_numpy(mask)].mean()) if mask.any() else 0.0
    bbox = None
    if mask.any():
        rows, cols = np.nonzero(mask)
        bbox = (int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
    return Region(code, label, index, mask_logits.float().cpu(), mask, prob, bbox)
