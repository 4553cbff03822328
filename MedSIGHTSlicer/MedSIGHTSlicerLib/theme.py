"""Colours from the widget's palette, so the panel reads well in Slicer's light and dark themes.

Slicer's dark theme swaps the palette; a hard-coded dark grey or deep red on it is unreadable. Every colour the
module's own widgets draw (text, secondary text, accent, error, success) is taken or mixed from the palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .qt_shim import prop, qt

__all__ = ["Colours", "colours_of", "contrast", "mix", "readable"]


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
    return tuple(x + (y - x) * t for x, y in zip(a, b))


def _luma(rgb: tuple[float, float, float]) -> float:
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def _linear(channel: float) -> float:
    c = channel / 255
    return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """WCAG 2 contrast ratio of two RGB colours (1 to 21)."""
    la, lb = (0.2126 * _linear(c[0]) + 0.7152 * _linear(c[1]) + 0.0722 * _linear(c[2]) for c in (a, b))
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def readable(colour: tuple[float, float, float], base: tuple[int, int, int], text: tuple[int, int, int],
             ratio: float = 4.5) -> tuple[float, float, float]:
    """``colour``, moved towards the text colour just enough to reach WCAG AA ``ratio`` on ``base`` (a palette's
    highlight is often too dark to read as text on a dark theme's base)."""
    for step in range(11):
        mixed = mix(colour, text, step / 10)
        if contrast(mixed, base) >= ratio:
            return mixed
    return text


def colours_of(widget: Any) -> Colours:
    """The module's colours for ``widget``'s current palette."""
    palette = prop(widget, "palette")  # a property in PythonQt, a method in PySide
    text = _rgb(palette.color(qt.QPalette.Text))
    base = _rgb(palette.color(qt.QPalette.Base))
    dark = _luma(base) < 128
    # Fixed hues, with lightness chosen for the background: saturated on light, pastel on dark.
    red, green = ((239, 83, 80), (102, 187, 106)) if dark else ((198, 40, 40), (46, 125, 50))
    return Colours(
        text=_hex(text),
        base=_hex(base),
        secondary=_hex(readable(mix(text, base, 0.45), base, text)),
        accent=_hex(readable(_rgb(palette.color(qt.QPalette.Highlight)), base, text)),
        error=_hex(readable(red, base, text)),
        success=_hex(readable(green, base, text)),
        dark=dark,
    )
