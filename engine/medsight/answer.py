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


def regions_from_logits(
    names: list[tuple[str | None, str]], mask_logits: torch.Tensor, source_logits: torch.Tensor
) -> list[Region]:
    """One Region per channel: `names[k]` is (code, label), `mask_logits` (K, m, m) are the logits over the model
    input and `source_logits` (K, H, W) the same logits mapped onto the source grid.

    All K masks are thresholded and summarised in one pass (a volume answer has hundreds of regions).
    """
    if len(names) != mask_logits.shape[0] or source_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"{len(names)} names for {mask_logits.shape[0]} mask channels "
                         f"and {source_logits.shape[0]} source channels")
    source = source_logits.float()
    mask = source > 0
    counts = mask.sum(dim=(1, 2))
    # An empty mask sums to 0 over a count clamped to 1: probability 0.
    probability = torch.where(mask, torch.sigmoid(source), 0).sum(dim=(1, 2)) / counts.clamp(min=1)
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (K, H), (K, W)

    def first_last(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(hit.shape[1], device=hit.device)
        return torch.where(hit, index, hit.shape[1]).amin(1), torch.where(hit, index, -1).amax(1)

    (r0, r1), (c0, c1) = first_last(rows), first_last(cols)
    masks = mask.cpu().numpy()
    stats = torch.stack([counts, r0, c0, r1, c1]).cpu().tolist()
    probability = probability.cpu().tolist()
    logits = mask_logits.float().cpu()
    regions = []
    for k, (code, label) in enumerate(names):
        count, *box = (column[k] for column in stats)
        bbox = tuple(int(v) for v in box) if count else None
        regions.append(Region(code, label, k, logits[k], masks[k], float(probability[k]), bbox))
    return regions
