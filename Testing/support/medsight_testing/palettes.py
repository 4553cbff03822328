"""A dark application palette (like Slicer's dark theme) and the WCAG contrast ratio, for the panels' theme tests.

The contrast is computed here, independently of `MedSIGHTSlicerLib.theme`, so the tests check the module's colours
rather than repeat its arithmetic."""

from __future__ import annotations

from MedSIGHTSlicerLib.qt_shim import qt


def dark_palette():
    palette = qt.QPalette()
    for role, rgb in (
        (qt.QPalette.Window, (42, 42, 42)), (qt.QPalette.Base, (30, 30, 30)), (qt.QPalette.AlternateBase, (45, 45, 45)),
        (qt.QPalette.Text, (230, 230, 230)), (qt.QPalette.WindowText, (230, 230, 230)),
        (qt.QPalette.Button, (53, 53, 53)), (qt.QPalette.ButtonText, (230, 230, 230)),
        (qt.QPalette.Highlight, (42, 130, 218)), (qt.QPalette.HighlightedText, (255, 255, 255)),
    ):
        palette.setColor(role, qt.QColor(*rgb))
    return palette


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #rrggbb colours."""

    def luminance(colour: str) -> float:
        channels = [int(colour[n : n + 2], 16) / 255 for n in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)
