"""One spelling of Qt for the module's widgets, inside 3D Slicer and outside it.

Inside Slicer, ``qt`` is PythonQt's module, where every class (widgets, QTimer, QUrl, ...) sits in one flat
namespace. Outside (the tests), the same names are looked up in qtpy's QtWidgets, QtGui and QtCore (PySide6
behind it), so ``qt.QWidget``, ``qt.QTimer`` and ``qt.Qt.AlignLeft`` work the same in both places.

Usage::

    from MedSIGHTSlicerLib.qt_shim import qt, connect, grab_png
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["IN_SLICER", "connect", "grab_png", "prop", "qt"]


class _FlatQt:
    """Attribute look-up across qtpy's modules, in the order a name is most likely to live in."""

    def __init__(self, *modules: Any) -> None:
        self._modules = modules

    def __getattr__(self, name: str) -> Any:
        for module in self._modules:
            value = getattr(module, name, None)
            if value is not None:
                setattr(self, name, value)  # cache: later look-ups skip __getattr__
                return value
        raise AttributeError(f"Qt has no {name!r} in {[m.__name__ for m in self._modules]}")


try:  # 3D Slicer (PythonQt)
    import qt as _slicer_qt  # type: ignore[import-not-found]

    qt: Any = _slicer_qt
    IN_SLICER = True
except ImportError:  # plain Python: tests, documentation screenshots
    from qtpy import QtCore, QtGui, QtWidgets

    qt = _FlatQt(QtWidgets, QtGui, QtCore)
    IN_SLICER = False


def connect(owner: Any, signal: str, slot: Callable[..., Any]) -> None:
    """Connect ``owner.<signal>`` to ``slot``.

    Both bindings expose signals as attributes with ``.connect``, so the name alone (``"clicked"``, not
    ``"clicked(bool)"``) is enough; a C++-style signature is accepted and its argument list dropped.
    """
    name = signal.split("(", 1)[0]
    getattr(owner, name).connect(slot)


def grab_png(widget: Any, path: str) -> bool:
    """Render ``widget`` (also when it is not shown on a screen) into a PNG file; True on success."""
    pixmap = widget.grab()
    return bool(pixmap.save(str(path), "PNG"))


def prop(obj: Any, name: str) -> Any:
    """Read a Qt property: PythonQt exposes ``spinBox.value`` as a value, PySide as a method ``value()``."""
    value = getattr(obj, name)
    return value() if callable(value) else value
