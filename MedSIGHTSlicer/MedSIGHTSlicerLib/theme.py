"""Colours from the widget's palette, so the panel reads well in Slicer's light and dark themes.

Slicer's dark theme swaps the palette; a hard-coded dark grey or deep red on it is unreadable. Every colour the
module's own widgets draw (text, secondary text, accent, error, success) is taken or mixed from the palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .qt_shim import qt

__all__ = ["Colours", "colours_of", "is_dark", "mix"]


@dataclass(frozen=True)
class Colours:
    """Hex colours (#rrggbb) for one palette."""

    text: str
    base: str
    secondary: str
    accent: str
    error: str
    success: str
    dark: bool


def _rgb(colour: Any) -> tuple[int, int, int]:
    return int(colour.red()), int(colour.green()), int(colour.blue())


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(max(0, min(255, round(c))) for c in rgb))


def mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[float, float, float]:
    """``a`` moved a fraction ``t`` of the way to ``b``."""
    return tuple(x + (y - x) * t for x, y in zip(a, b))  # noqa: B905 - two RGB triples


def _luma(rgb: tuple[float, float, float]) -> float:
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def is_dark(widget: Any) -> bool:
    """Whether the widget's background is dark (Slicer's dark theme)."""
    return colours_of(widget).dark


def colours_of(widget: Any) -> Colours:
    """The module's colours for ``widget``'s current palette."""
    palette = widget.palette() if callable(widget.palette) else widget.palette
    text = _rgb(palette.color(qt.QPalette.Text))
    base = _rgb(palette.color(qt.QPalette.Base))
    dark = _luma(base) < 128
    # Fixed hues, with lightness chosen for the background: saturated on light, pastel on dark.
    red, green = ((239, 83, 80), (102, 187, 106)) if dark else ((198, 40, 40), (46, 125, 50))
    return Colours(
        text=_hex(text),
        base=_hex(base),
        secondary=_hex(mix(text, base, 0.45)),
        accent=_hex(_rgb(palette.color(qt.QPalette.Highlight))),
        error=_hex(red),
        success=_hex(green),
        dark=dark,
    )
