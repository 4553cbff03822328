"""2D samples: product-identical slicing/windowing of the sources, square padding and resizing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from medsight.imaging import Volume, extract_slice, slice_count, to_rgb

from .catalog import CT_ABDOMEN, CXR, MRI_BRAIN, WHOLES, Source
from .sources import Image2D, MNITemplate, Phantom, make_brain_subject, make_ct_phantom, make_cxr

#: A mask smaller than this (pixels, after resizing) is dropped: it would be noise for a 56-112 px model.
MIN_MASK_PIXELS = 8
#: A lesion must cover at least this many pixels of a 112 px image (scaled with the image area) to be labelled; a
#: slice that cuts a lesion more thinly is left out, since "is there a lesion?" has no clear answer there and a
#: 2-3 px fleck is below what a 14 px-patch ViT can see.
MIN_LESION_PIXELS_AT_112 = 36


#: A lesion must stand out from the tissue around it in the displayed image to be labelled: its mean grey level must
#: differ from that of a thin ring around it by this many standard deviations of the ring. Fainter ones (T1-bright
#: lesions clipped by the window, nodules blending into the chest wall) are left out like thin cuts: a reader would
#: answer "no lesion" there, and such labels taught the demo model that "yes" cannot be read from the image.
MIN_LESION_CONTRAST = 1.5
#: Width of that ring at 112 px (scaled with the image size).
CONTRAST_RING_AT_112 = 3

#: Slab pixels a lesion must cover for its slice to be picked as a lesion slice (slabs are ~100-128 px wide).
LESION_SLICE_AREA = 40
#: Chance that a volume subject also gives one slice with none of its structures (beyond the anatomy, such as the
#: blank slices above and below the brain), if it has one. Without them the model never saw a blank slice and, asked
#: to segment the white matter on one, answered with broken text ("The white matter isNo.").
EMPTY_SLICE_P = 0.5


@dataclass
class Sample2D:
    """One 8-bit RGB image with its binary structure masks and provenance."""

    sample_id: str
    source: Source
    subject: str
    split: str
    image: np.ndarray  # (S, S, 3) uint8
    masks: dict[str, np.ndarray]  # structure -> (S, S) bool, only non-empty ones
    #: Structures with no pixel at all in the source slice: safe to answer "no" about.
    absent: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    @property
    def modality_label(self) -> int:
        return self.source.modality_label


def _square(a: np.ndarray) -> np.ndarray:
    """Pad (H, W[, C]) symmetrically with zeros to a square: zero is black/air after windowing."""
    h, w = a.shape[:2]
    n = max(h, w)
    pad = [((n - h) // 2, n - h - (n - h) // 2), ((n - w) // 2, n - w - (n - w) // 2)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    sq = _square(rgb)
    if sq.shape[0] == size:
        return sq
    return np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    sq = _square(mask.astype(np.uint8) * 255)
    if sq.shape[0] != size:
        # Bilinear then > 50%: nearest-neighbour would make ragged, biased edges when shrinking.
        sq = np.asarray(Image.fromarray(sq).resize((size, size), Image.BILINEAR))
    return sq > 127


def lesion_contrast(rgb: np.ndarray, mask: np.ndarray) -> float:
    """|mean(lesion) - mean(ring)| / std(ring) on the displayed grey levels; ring width scales with the size."""
    grey = rgb.astype(np.float64).mean(axis=-1) if rgb.ndim == 3 else rgb.astype(np.float64)
    width = max(1, round(CONTRAST_RING_AT_112 * mask.shape[0] / 112))
    ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
    if not mask.any() or not ring.any():
        return 0.0
    return float(abs(grey[mask].mean() - grey[ring].mean()) / (grey[ring].std() + 1e-6))


def _finish(
    sample_id: str, source: Source, subject: str, split: str, rgb: np.ndarray, masks: dict[str, np.ndarray],
    size: int, info: dict, empty_ok: bool = False,
) -> Sample2D | None:
    """Resize image and masks; None when a lesion is present but too small or too faint to label (a "no" from a
    reader would be marked wrong), or when no structure is left and ``empty_ok`` is False."""
    out, absent = {}, []
    image = _resize_rgb(rgb, size)
    min_lesion = MIN_LESION_PIXELS_AT_112 * (size / 112) ** 2
    for name in source.structures:
        m = masks.get(name)
        if m is None or not m.any():
            absent.append(name)
            continue
        r = _resize_mask(m, size)
        if name == "lesion" and (r.sum() < min_lesion or lesion_contrast(image, r) < MIN_LESION_CONTRAST):
            return None
        if r.sum() >= MIN_MASK_PIXELS:
            out[name] = r
        elif name == "lesion":
            return None
    if not out and not (empty_ok and len(absent) == len(source.structures)):
        return None
    add_wholes(source, out, absent)
    return Sample2D(sample_id, source, subject, split, image, out, tuple(absent), info)


def add_wholes(source: Source, masks: dict[str, np.ndarray], absent: list[str]) -> None:
    """Add each whole organ of ``source`` (`WHOLES`) to ``masks`` as the union of its parts' masks, or to
    ``absent`` when none of its parts has a pixel in the slice (in place)."""
    for whole, parts in WHOLES[source.key].items():
        shown = [masks[p] for p in parts if p in masks]
        if shown:
            masks[whole] = np.logical_or.reduce(shown)
        elif all(p in absent for p in parts):
            absent.append(whole)


def _volume_slices(
    phantom: Phantom, source: Source, subject: str, split: str, rng: np.random.Generator, n: int, size: int,
    window: dict,
) -> list[Sample2D]:
    """``n`` axial slices of a volume, half of them through lesions when there are any; with `EMPTY_SLICE_P` one
    more that shows none of the structures."""
    vol: Volume = phantom.volume
    count = slice_count(vol, "axial")
    slabs = [extract_slice(vol, "axial", k) for k in range(count)]
    areas = {name: np.array([s.take(m).sum() for s in slabs]) for name, m in phantom.masks.items()}
    organ_area = sum(a for name, a in areas.items() if name != "lesion")
    candidates = np.flatnonzero(organ_area >= 0.15 * organ_area.max())
    lesion_k = np.flatnonzero(areas["lesion"] >= LESION_SLICE_AREA)
    picks: list[int] = []
    if len(lesion_k):
        picks += list(rng.choice(lesion_k, size=min(len(lesion_k), (n + 1) // 2), replace=False))
    rest = [k for k in candidates if k not in picks]
    picks += list(rng.choice(rest, size=min(len(rest), n - len(picks)), replace=False))
    empty_k = np.flatnonzero(sum(areas.values()) == 0)
    if len(empty_k) and rng.random() < EMPTY_SLICE_P:
        picks.append(int(rng.choice(empty_k)))
    out = []
    for k in sorted(int(k) for k in picks):
        s = slabs[k]
        # Exactly the product's display path: whole-volume window for MR, the abdomen preset for CT.
        rgb = to_rgb(s.pixels, vol.modality, window_from=vol.array, **window)
        masks = {name: s.take(m) for name, m in phantom.masks.items()}
        smp = _finish(f"{subject}_z{k:03d}", source, subject, split, rgb, masks, size, {"plane": "axial", "index": k},
                      empty_ok=k in empty_k)
        if smp is not None:
            out.append(smp)
    return out


def ct_samples(rng: np.random.Generator, subject: str, split: str, n: int, size: int) -> tuple[list[Sample2D], Phantom]:
    """Axial slices of one abdominal CT phantom, abdomen window."""
    ph = make_ct_phantom(rng)
    return _volume_slices(ph, CT_ABDOMEN, subject, split, rng, n, size, {"preset": "abdomen"}), ph


def brain_samples(
    rng: np.random.Generator, subject: str, split: str, n: int, size: int, template: MNITemplate | None = None
) -> tuple[list[Sample2D], Phantom]:
    """Axial slices of one synthetic MNI152-based T1 subject, robust-percentile window."""
    ph = make_brain_subject(rng, template)
    return _volume_slices(ph, MRI_BRAIN, subject, split, rng, n, size, {}), ph


def cxr_samples(
    rng: np.random.Generator, subject: str, split: str, n: int, size: int
) -> tuple[list[Sample2D], Image2D]:
    """One chest X-ray-like image per subject (``n`` is ignored beyond 1: a radiograph has one view here)."""
    im = make_cxr(rng, size=max(size, 64))
    rgb = to_rgb(im.pixels, CXR.dicom_modality)
    smp = _finish(f"{subject}_pa", CXR, subject, split, rgb, im.masks, size, {"plane": "pa"})
    return ([smp] if smp is not None else []), im
