"""A real uvicorn server with the tiny model, and a real MRI volume (nilearn's MNI152 template)."""

from __future__ import annotations

import numpy as np
import pytest

import medsight
from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server


@pytest.fixture(scope="session")
def engine():
    return medsight.Engine.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def server(engine):
    with live_server(create_app(engine, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="session")
def mni():
    """(k, j, i) float32 voxels and LPS geometry of the MNI152 T1 template."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return data, tuple(spacing), tuple(affine[:3, 3]), affine[:3, :3] / spacing


@pytest.fixture(scope="session")
def mni_upload(mni):
    data, spacing, origin, direction = mni
    params = {
        "modality": "MR",
        "spacing": ",".join(map(str, spacing)),
        "origin": ",".join(map(str, origin)),
        "direction": ",".join(map(str, np.asarray(direction).ravel())),
    }
    return npy(data), params
