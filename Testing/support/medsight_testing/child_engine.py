"""Running this checkout's engine in a child Python, and reading what it imported."""

from __future__ import annotations

import os
from pathlib import Path

import medsight

#: The checkout's engine, for the child (the installed `medsight` may be another checkout's).
ENGINE = Path(medsight.__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout's engine first on the child's PYTHONPATH, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENGINE), os.environ.get("PYTHONPATH", "")]), **extra}


def imported_modules(stderr: str) -> set[str]:
    """The modules whose import finished, from ``python -X importtime``'s lines ("import time: self | total | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
