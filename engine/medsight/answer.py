"""What the model returns for a question: the answer text and one region per generated code.

One type for every caller: `Engine.ask` returns one `Answer` per slice, `MedSIGHTModel.ask` (which runs the
engine) one for its image, and the server converts these to its wire schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from medsight.imaging import Slice


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
        slice_index: the slice it lies on (see `Answer.slice_index`).
    """

    code: str | None
    label: str
    index: int
    mask_logits: torch.Tensor
    mask: np.ndarray
    probability: float
    bbox: tuple[int, int, int, int] | None
    slice_index: int = 0

    @property
    def modality(self) -> int | None:
        return None if self.code is None else int(self.code[2:-1].split("_")[0])


@dataclass
class Timings:
    """Seconds spent per stage. Per slice, a batched stage's time is shared equally among its slices."""

    encode: float = 0.0
    generate: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.generate + self.decode


@dataclass
class Answer:
    """The answer to one question about one image or volume slice.

    Attributes:
        text: answer text without special tokens or the `assistant` header.
        regions: one per generated code, masks on the slice's pixel grid.
        token_ids: generated ids, end-of-turn included when reached.
        cancelled: the answer was cut short by the caller.
        slice_index: the volume slice index, or the image's position in the list for plain images.
        timings: this slice's share of the ask's stage times.
        cached: the image features came from the cache (no encode ran for this slice).
        slice: geometry of a volume slice (pixel -> voxel -> RAS); None for plain images.
    """

    text: str
    regions: list[Region] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    slice_index: int = 0
    timings: Timings = field(default_factory=Timings)
    cached: bool = False
    slice: Slice | None = None


def regions_from_logits(
    names: list[tuple[str | None, str]], mask_logits: torch.Tensor, source_logits: torch.Tensor, slice_index: int = 0
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
        regions.append(Region(code, label, k, logits[k], masks[k], float(probability[k]), bbox, slice_index))
    return regions
