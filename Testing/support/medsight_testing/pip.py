"""pip as Slicer's ``slicer.util.pip_install`` runs it, for tests of what the module does when an install fails.

Slicer's pip_install runs ``python -m pip install ...`` and raises CalledProcessError on a non-zero exit
(Base/Python/slicer/util.py, logProcessOutput, v5.8.0 to v5.12.0). ``--no-index`` keeps it offline, so installing
``UNINSTALLABLE`` fails the same way everywhere. Standard library only (also runs under Slicer's Pythons).
"""

from __future__ import annotations

import subprocess
import sys

UNINSTALLABLE = "medsight-no-such-package<2"


def pip_install(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", *args], check=True,
                   capture_output=True)
