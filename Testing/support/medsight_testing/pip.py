"""pip as Slicer's ``slicer.util.pip_install`` runs it, for tests of what the module does when an install fails.

Slicer's pip_install runs ``python -m pip install ...`` and raises CalledProcessError on a non-zero exit
(Base/Python/slicer/util.py, logProcessOutput, v5.8.0 to v5.12.0): ``pip_install`` is Slicer 5.8's and 5.10's,
``SlicerPackagingPipInstall`` 5.12's, which shows dialogs of its own. ``--no-index`` keeps it offline, so installing
``UNINSTALLABLE`` fails the same way everywhere. Standard library only (also runs under Slicer's Pythons).
"""

from __future__ import annotations

import subprocess
import sys

UNINSTALLABLE = "medsight-no-such-package<2"


def pip_install(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", *args], check=True,
                   capture_output=True)


class SlicerPackagingPipInstall:
    """``slicer.util.pip_install`` of Slicer 5.12 and later: ``pip_install(requirements, **kwargs)``, handed on to
    ``slicer.packaging.pip_install`` (Base/Python/slicer/packaging.py, v5.12.0 to main). By default
    (``show_progress=True``) it shows a modal progress dialog and, when pip fails, an error dialog with pip's log
    before it raises CalledProcessError(code, "pip install") (``_pip_install_with_dialog``); ``show_progress=False``
    only raises (``_pip_install_with_busy_cursor``). ``dialogs`` lists the dialogs it showed."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []

    def __call__(self, requirements: list[str], **kwargs: object) -> None:
        show_progress = kwargs.get("show_progress", True)
        if show_progress:
            self.dialogs.append("Installing Python packages")
        try:
            pip_install(requirements)
        except subprocess.CalledProcessError as err:
            if show_progress:
                self.dialogs.append("Package installation failed.")
            raise subprocess.CalledProcessError(err.returncode, "pip install") from None
