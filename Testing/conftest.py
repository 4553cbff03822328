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


def pytest_addoption(parser) -> None:
    parser.addoption("--golden-only", action="store_true",
                     help="run only the tests that read the golden fixtures (those using the `golden` fixture)")


def pytest_collection_modifyitems(config, items) -> None:
    # test_golden_fixtures reruns the parity tests on a fixture set of other sizes: a test that never reads the golden
    # fixtures (the `golden` fixture is their one way in) would only repeat its run with the same inputs.
    if not config.getoption("--golden-only"):
        return
    readers = [item for item in items if "golden" in getattr(item, "fixturenames", ())]
    others = [item for item in items if item not in readers]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = readers
