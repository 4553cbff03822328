"""Python packages the module installs into Slicer, without touching the ones Slicer ships.

DICOM SEG export needs highdicom. highdicom 0.23 and later need pydicom 3 and Python 3.10; Slicer 5.8 (Python 3.9)
and 5.10 (Python 3.12) both bundle pydicom 2.4, Slicer 5.12 pydicom 3.0. An unpinned install would either fail to
find a release that has what ``dicom_seg`` calls (Slicer 5.8) or upgrade Slicer's own pydicom and pillow (Slicer
5.10). So the highdicom requirement follows the installed pydicom, and a pip constraints file pins everything Slicer
already has.

Standard library only.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from importlib.util import find_spec

__all__ = ["PINNED", "constraints_file", "constraints_text", "dicom_seg_requirements", "ensure", "installed_versions",
           "missing", "pip_install_without_dialogs", "requirement_name"]

#: Packages Slicer ships that an install must never up- or downgrade.
PINNED = ("numpy", "pydicom", "pillow", "packaging", "typing-extensions")
_IMPORT_NAMES = {"pillow": "PIL", "typing-extensions": "typing_extensions"}


def requirement_name(requirement: str) -> str:
    """'highdicom>=0.22,<0.23' -> 'highdicom'."""
    return re.split(r"[<>=!~;\[\s]", requirement.strip(), maxsplit=1)[0]


def installed_versions(names: Sequence[str] = PINNED) -> dict[str, str]:
    """Distribution name -> installed version, for those installed."""
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _major(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def dicom_seg_requirements(versions: Mapping[str, str] | None = None) -> list[str]:
    """The highdicom that fits the installed pydicom (pydicom 2.x: highdicom 0.22; pydicom 3: 0.23 or later)."""
    versions = installed_versions() if versions is None else versions
    pydicom = versions.get("pydicom")
    if pydicom is not None and _major(pydicom) < 3:
        return ["highdicom>=0.22,<0.23"]
    return ["highdicom>=0.23,<1"]


def constraints_text(versions: Mapping[str, str] | None = None) -> str:
    """pip constraints that hold every shipped package at its installed version."""
    versions = installed_versions() if versions is None else versions
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


@contextlib.contextmanager
def constraints_file(versions: Mapping[str, str] | None = None) -> Iterator[str]:
    """A temporary constraints file (its path) for ``pip install --constraint``."""
    handle, path = tempfile.mkstemp(prefix="medsight-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(constraints_text(versions))
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def missing(requirements: Sequence[str]) -> list[str]:
    """The requirements whose package cannot be imported."""
    out = []
    for requirement in requirements:
        name = requirement_name(requirement)
        module = _IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
        if find_spec(module) is None:
            out.append(requirement)
    return out


def pip_install_without_dialogs(pip_install: Callable[..., object], arguments: list[str]) -> None:
    """Run Slicer's ``slicer.util.pip_install`` so that a failure reaches the user once: as the caller's error.

    Slicer 5.8 and 5.10 have ``pip_install(requirements)``: pip runs, its output goes to the Python console, and a
    failure raises CalledProcessError. From 5.12 on, ``pip_install(requirements, **kwargs)`` hands on to
    ``slicer.packaging.pip_install``, which by default shows a modal progress dialog and, when pip fails, an error
    dialog of its own before it raises (Base/Python/slicer/packaging.py, ``_pip_install_with_dialog``): the user got
    that dialog, then the module's own "Export failed" for the same failure. ``show_progress=False`` keeps 5.12 to
    what the older versions do (a busy cursor, then the raise), and is passed only where pip_install takes it."""
    parameters = inspect.signature(pip_install).parameters.values()
    if any(p.kind is p.VAR_KEYWORD or p.name == "show_progress" for p in parameters):
        pip_install(arguments, show_progress=False)
    else:
        pip_install(arguments)


def ensure(requirements: Sequence[str], purpose: str, confirm: Callable[[str], bool],
           install: Callable[[list[str]], object]) -> bool:
    """Install the missing ``requirements`` once the user agrees, keeping every package Slicer ships as it is.

    Args:
        purpose: what needs them, for the question (e.g. "DICOM SEG export").
        confirm: (question) -> whether the user agreed.
        install: (pip arguments) -> None; Slicer's ``slicer.util.pip_install`` (through
            `pip_install_without_dialogs`), which prints pip's output to the Python console and raises
            CalledProcessError (its text a pip command line) when pip fails.

    Returns False when the user declined. Raises ValueError naming the packages when the install failed or what it
    installed cannot be imported.
    """
    todo = missing(requirements)
    if not todo:
        return True
    names = ", ".join(requirement_name(r) for r in todo)
    if not confirm(f"{purpose} needs the Python package(s) {names}. Install them into 3D Slicer now?"):
        return False
    with constraints_file() as constraints:
        try:
            install([*todo, "--constraint", constraints])
        except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
            code = getattr(err, "returncode", None)
            why = f"pip exit status {code}" if code is not None else str(err)
            raise ValueError(f"installing {names} into Slicer's Python failed ({why}); pip's output is in the "
                             "Python console") from err
    # Packages that appeared while Python runs are found only once the import system's folder caches are dropped.
    # pip can also succeed into a folder Slicer's Python does not search (a user site it leaves out).
    importlib.invalidate_caches()
    unimportable = missing(todo)
    if unimportable:
        raise ValueError(f"pip installed {', '.join(requirement_name(r) for r in unimportable)}, but Slicer's "
                         "Python cannot import it; restart 3D Slicer and try again, and see pip's output in the "
                         "Python console for where it was installed")
    return True
