"""A tiny demo data set built once per session for the demo tests that read the builder's output."""

from __future__ import annotations

import pytest

from medsight.demo import DemoDataset, build_demo_data


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> DemoDataset:
    pytest.importorskip("nilearn")
    return build_demo_data(tmp_path_factory.mktemp("tiny_demo") / "data", size="tiny", seed=0)
