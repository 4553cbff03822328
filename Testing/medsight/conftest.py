"""Golden fixtures shared by the model and training tests: the golden weights laid out in the official release
layouts (the way users receive them) and loaded through the user-facing loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsight.model.loading import load_official
from medsight_testing.golden import golden_base_config
from medsight_testing.release import write_release


@pytest.fixture(scope="session")
def release_dir(golden: Path, tmp_path_factory) -> Path:
    return write_release(golden, tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="session")
def golden_model(golden: Path, release_dir: Path):
    """The tiny golden model loaded through the official-layout loader, in float64 like the fixtures."""
    model = load_official(
        release_dir / "medsight_full_instruct",
        release_dir / "region_perceiver" / "0079280.pt",
        release_dir / "unimed_clip_vit_l14.pt",
        release_dir / "codebook" / "0035673.pt",
        base=golden_base_config(golden),
    )
    return model.to(torch.float64)


@pytest.fixture(scope="session")
def perceiver_io(golden: Path) -> dict:
    return torch.load(golden / "perceiver_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def stage2_io(golden: Path) -> dict:
    return torch.load(golden / "stage2_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def lvlm_io(golden: Path) -> dict:
    return torch.load(golden / "lvlm_io.pt", weights_only=True)
