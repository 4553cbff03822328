"""Intensity windowing to the 8-bit RGB the vision model expects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImagingError


@dataclass(frozen=True)
class Window:
    """A linear display window: ``center`` ± ``width`` / 2 maps to 0..255."""

    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


#: Standard CT windows in Hounsfield units (level, width).
CT_PRESETS: dict[str, Window] = {
    "abdomen": Window(50, 400),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "liver": Window(30, 150),
}
DEFAULT_CT_PRESET = "abdomen"
#: Robust percentiles for modalities without absolute units (MR, US, PET, X-ray, ...).
DEFAULT_PERCENTILES = (0.5, 99.5)


def robust_window(values: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> Window:
    """Window spanning the given percentiles of ``values`` (a slice or, for consistency, the volume)."""
    v = np.asarray(values)
    if v.size == 0:
        raise ImagingError("cannot window an empty array")
    lo, hi = (float(x) for x in np.percentile(v, percentiles))
    window = Window((lo + hi) / 2, hi - lo)
    if hi <= lo or too_narrow(window):  # constant image (to display): any positive width shows it as one grey
        # ... whose ends still differ in float32: 1.0 does up to 2**24, a few float32 steps beyond (1e8 is constant
        # to float32 itself, and a width of 1.0 there was refused as too narrow).
        # (Capped: beyond MAX_WINDOW_VALUE the window check refuses it; a float32 cast would warn of overflow first.)
        return Window(lo, max(1.0, 4 * float(np.spacing(np.float32(min(abs(lo), MAX_WINDOW_VALUE))))))
    return window


#: Preset names that ask for the percentile window of any modality.
AUTO_PRESETS = ("auto", "percentile", "robust")
#: Beyond this magnitude a window bound overflows the float32 arithmetic of `apply_window` (to inf, then NaN).
MAX_WINDOW_VALUE = 1e30
FLOAT32_MAX = float(np.finfo(np.float32).max)


def too_narrow(window: Window) -> bool:
    """Whether `apply_window`'s float32 arithmetic cannot map `window` onto 0..255: its scale 255 / width overflows,
    or its ends round to one float32 value (then inf * 0 = NaN: numpy warnings, and NaN cast to any grey)."""
    with np.errstate(over="ignore"):  # an end beyond float32 is infinite there: the "beyond" check's to refuse
        low, high = np.float32(window.low), np.float32(window.high)
    return 255.0 / window.width > FLOAT32_MAX or not low < high


def explicit_window(center: float, width: float) -> Window:
    """A window from a center and width; ImagingError unless both are finite and the width positive."""
    window = Window(float(center), float(width))
    if not (np.isfinite(window.center) and np.isfinite(window.width) and window.width > 0):
        raise ImagingError(f"a window needs a finite center and a positive finite width, got center {center}, "
                           f"width {width}")
    if max(abs(window.low), abs(window.high)) > MAX_WINDOW_VALUE:
        raise ImagingError(f"window {window.low:g}..{window.high:g} is beyond +-{MAX_WINDOW_VALUE:g}")
    if too_narrow(window):
        raise ImagingError(f"window width {width:g} is too narrow for center {center:g}: in the 32-bit arithmetic "
                           f"of 8-bit display its ends must differ and 255 / width must be finite")
    return window


def preset_window(preset: str, modality: str) -> Window | None:
    """The CT window a preset names, or None for a percentile preset ("auto").

    Raises ImagingError for an unknown name, or a CT preset (Hounsfield units) on another modality.
    """
    key = preset.lower()
    if key in AUTO_PRESETS:
        return None
    if key not in CT_PRESETS:
        raise ImagingError(f"unknown window preset {preset!r}; known: {', '.join(CT_PRESETS)}, auto")
    if modality.upper() != "CT":
        raise ImagingError(f"preset {preset!r} is in Hounsfield units and needs CT, not {modality}")
    return CT_PRESETS[key]


def choose_window(
    values: np.ndarray,
    modality: str,
    preset: str | None = None,
    center: float | None = None,
    width: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> Window:
    """An explicit center/width wins, then a named CT preset, then the CT default, else percentiles."""
    if (center is None) != (width is None):
        raise ImagingError("give both window center and width, or neither")
    if center is not None and width is not None:
        return explicit_window(center, width)
    if preset is not None:
        return preset_window(preset, modality) or robust_window(values, percentiles)
    if modality.upper() == "CT":
        return CT_PRESETS[DEFAULT_CT_PRESET]
    return robust_window(values, percentiles)


def apply_window(values: np.ndarray, window: Window, invert: bool = False) -> np.ndarray:
    """Grey values -> uint8 RGB (``values.shape + (3,)``); colour input (last axis 3) is rescaled only."""
    v = np.asarray(values)
    if v.ndim >= 3 and v.shape[-1] == 3 and v.dtype == np.uint8:
        return v.copy()  # already display RGB
    # A voxel far outside the window (float64 beyond float32, or 3e38 at width 1) overflows to +-inf here, which the
    # clip below maps to 255 or 0 as it should: numpy's warning about it is noise in the engine's terminal.
    with np.errstate(over="ignore"):
        scaled = (v.astype(np.float32) - np.float32(window.low)) * np.float32(255.0 / window.width)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if invert:
        out = 255 - out
    if v.ndim >= 3 and v.shape[-1] == 3:
        return out
    return np.repeat(out[..., None], 3, axis=-1)


def to_rgb(
    values: np.ndarray,
    modality: str = "OT",
    preset: str | None = None,
    center: float | None = None,
    width: float | None = None,
    invert: bool = False,
    window_from: np.ndarray | None = None,
) -> np.ndarray:
    """Window a 2D slice (H, W) or colour slice (H, W, 3) to uint8 (H, W, 3).

    ``window_from`` (e.g. the whole volume) sets the percentile window so all slices match.
    """
    v = np.asarray(values)
    if v.ndim == 3 and v.shape[-1] == 3:
        if v.dtype == np.uint8:
            return v.copy()
        w = choose_window(v if window_from is None else window_from, "OT", None, center, width)
        return apply_window(v, w, invert)
    if v.ndim != 2:
        raise ImagingError(f"to_rgb expects an (H, W) or (H, W, 3) slice, got shape {v.shape}")
    w = choose_window(v if window_from is None else window_from, modality, preset, center, width)
    return apply_window(v, w, invert)
