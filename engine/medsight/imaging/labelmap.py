"""Segments, segmentations, and assembly of per-slice masks into a labelmap on the source geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsight.naming import UNCODED, Term

from .errors import ImagingError
from .slicing import Slice
from .volume import Volume


@dataclass(frozen=True)
class Segment:
    """One labelled structure. ``region_code`` is the model's code, e.g. ``[M1_3]``."""

    label: int
    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)  # RGB in 0..1
    region_code: str | None = None
    terminology: Term = UNCODED

    def __post_init__(self) -> None:
        if not 0 < int(self.label) < 65536:
            raise ImagingError(f"segment label {self.label} must be in 1..65535")
        if len(self.color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in self.color):
            raise ImagingError(f"segment colour {self.color} must be three values in 0..1")
        if not self.name or "|" in self.name or "\n" in self.name:
            raise ImagingError(f"segment name {self.name!r} must be non-empty without '|' or newlines")


@dataclass
class Segmentation:
    """A labelmap (k, j, i) on ``reference``'s grid, its segments, optional probabilities (uint8 0..255)."""

    reference: Volume
    labelmap: np.ndarray
    segments: list[Segment]
    probabilities: dict[int, np.ndarray] | None = None
    overlap_voxels: int = 0  # voxels claimed by more than one segment (resolved by probability)

    def __post_init__(self) -> None:
        if tuple(self.labelmap.shape) != self.reference.shape:
            raise ImagingError(
                f"labelmap shape {self.labelmap.shape} is not the reference's {self.reference.shape}",
                self.reference.source,
            )
        labels = [s.label for s in self.segments]
        if len(set(labels)) != len(labels):
            raise ImagingError(f"duplicate segment labels {labels}")
        present = set(np.unique(self.labelmap).tolist()) - {0}
        if present - set(labels):
            raise ImagingError(f"labelmap values {sorted(present - set(labels))} have no segment")

    def mask(self, label: int) -> np.ndarray:
        return self.labelmap == label


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


class SegmentationBuilder:
    """Collects 2D masks from slices of one volume and builds a `Segmentation` on its grid.

    Masks may be boolean or probabilities in 0..1; several masks of one segment combine by maximum.
    """

    def __init__(self, reference: Volume) -> None:
        self.reference = reference
        self._segments: dict[int, Segment] = {}
        self._prob: dict[int, np.ndarray] = {}
        self._slices: dict[int, set[tuple[int, int]]] = {}  # label -> {(normal axis, index)}

    def add(self, slc: Slice, mask: np.ndarray, segment: Segment) -> None:
        """Place ``mask`` (the slice's pixel grid) on the slice's voxels for ``segment``."""
        if slc.volume_shape != self.reference.shape or not np.allclose(
            slc.slice_to_ras, self.reference.ijk_to_ras @ slc.pixel_to_ijk, atol=1e-6
        ):
            raise ImagingError("the slice does not come from this builder's volume", self.reference.source)
        known = self._segments.get(segment.label)
        if known is not None and known != segment:
            raise ImagingError(f"label {segment.label} is already used by segment {known.name!r}")
        m = np.asarray(mask)
        if m.ndim != 2 or m.shape != slc.shape:
            raise ImagingError(f"mask shape {m.shape} does not match the {slc.plane} slice {slc.shape}")
        if m.dtype == bool:
            q = m.astype(np.uint8) * 255
        else:
            mf = m.astype(np.float32)
            if not np.all(np.isfinite(mf)) or mf.min() < 0 or mf.max() > 1:
                raise ImagingError("mask values must be booleans or probabilities in 0..1")
            q = np.rint(mf * 255).astype(np.uint8)
        self._segments[segment.label] = segment
        prob = self._prob.setdefault(segment.label, np.zeros(self.reference.shape, np.uint8))
        slc.paste(prob, np.maximum(slc.take(prob), q))
        self._slices.setdefault(segment.label, set()).add((slc.layout.normal_axis, slc.index))

    def build(
        self,
        threshold: float = 0.5,
        largest_component: bool = False,
        fill_holes: bool = False,
        keep_probabilities: bool = False,
    ) -> Segmentation:
        """Threshold, optionally clean each segment, and resolve overlaps by the higher probability.

        ``fill_holes`` fills 2D holes in each slice a mask was added on (the plane it was drawn in);
        ``largest_component`` keeps each segment's largest 3D face-connected component.
        """
        labels = sorted(self._segments)
        dtype = np.uint8 if (not labels or labels[-1] < 256) else np.uint16
        labelmap = np.zeros(self.reference.shape, dtype)
        cut = int(np.ceil(threshold * 255)) if threshold > 0 else 1
        best = np.zeros(self.reference.shape, np.int16)  # score of the current owner (prob + 1)
        claims = np.zeros(self.reference.shape, np.uint8)
        for label in labels:
            prob = self._prob[label]
            mask = prob >= cut
            if fill_holes:
                for axis, index in self._slices[label]:
                    sl = [slice(None)] * 3
                    sl[2 - axis] = index  # (k, j, i) storage
                    mask[tuple(sl)] = ndimage.binary_fill_holes(mask[tuple(sl)])
            if largest_component:
                mask = _largest_component(mask)
            claims += mask
            score = np.where(mask, prob.astype(np.int16) + 1, 0)
            win = score > best
            labelmap[win] = label
            best[win] = score[win]
        probs = {lab: self._prob[lab] for lab in labels} if keep_probabilities else None
        return Segmentation(
            self.reference, labelmap, [self._segments[lab] for lab in labels], probs, int((claims > 1).sum())
        )
