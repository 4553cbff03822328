"""The golden fixtures ship with the repository, and the parity tests take every size from them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from medsight_testing.other_golden import write_other_fixture_set

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".json", ".yml", ".cfg", ".cmake"}
PARITY_TESTS = ["Testing/medsight/model", "Testing/medsight/train/test_losses.py"]


def test_nothing_reads_beside_the_checkout():
    """A clone with nothing beside it runs the suite: no file refers to a folder next to the repository."""
    outside = ".." + "/shared"  # split so that this file does not match itself
    hits = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") or d == ".ci"]  # skips .venv, .git
        for name in files:
            path = Path(folder) / name
            text = path.suffix in TEXT_SUFFIXES or name == "run"
            if text and outside in path.read_text(errors="ignore"):
                hits.append(str(path.relative_to(REPO)))
    assert hits == []
    assert (REPO / "Testing" / "golden" / "perceiver_io.pt").is_file()


def test_parity_tests_pass_on_a_fixture_set_of_other_sizes(golden, tmp_path):
    """A set with an odd grid, 2 perceiver stages, 12 queries, 9 classes, 3 LLM layers, another image, other codes
    and labels: a test that hard-codes a size, index, count or label of the shipped set fails here. Only the tests
    that read the fixtures run again (--golden-only): the others would repeat their first run unchanged."""
    other = write_other_fixture_set(golden, tmp_path / "other")
    env = {**os.environ, "MEDSIGHT_GOLDEN_DIR": str(other)}
    run = subprocess.run([sys.executable, "-m", "pytest", *PARITY_TESTS, "--golden-only", "-q", "-p",
                          "no:cacheprovider"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
