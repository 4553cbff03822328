"""Test-wide settings and fixtures.

Golden parity fixtures are read from MEDSIGHT_GOLDEN_DIR (default: Testing/golden in this repository).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups otherwise hang for ~25 s
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("MEDSIGHT_GOLDEN_DIR", REPO / "Testing" / "golden")).resolve()


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "perceiver_io.pt").is_file():
        pytest.fail(f"golden fixtures not found in {path}; set MEDSIGHT_GOLDEN_DIR")
    return path
