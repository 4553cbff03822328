"""Uploads at once into a volume store that holds one volume: each upload's reply describes the volume it sent,
and the bytes of uploads in flight stay within the store's bound (more are told to retry, never a 5xx)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server

NPY = {"content-type": "application/octet-stream"}
UPLOADS = 8


def test_concurrent_uploads_evicting_each_other_all_get_201(engine):
    """Before the fix, the reply re-read the store after the upload: a concurrent upload had often evicted the
    volume meanwhile, and the upload answered 404 unknown_volume (6 of 8 uploads of 64 MiB)."""
    volumes = [np.full((8, 128, 128), i, np.float32) for i in range(UPLOADS)]
    size = volumes[0].nbytes
    app = create_app(engine, model_name="tiny", store_bytes=int(size * 1.5))  # one volume fits
    with live_server(app) as url:
        def upload(volume: np.ndarray) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as c:
                return c.post("/v1/volumes", content=npy(volume), headers=NPY)

        with ThreadPoolExecutor(UPLOADS) as pool:
            replies = list(pool.map(upload, volumes))
    assert [r.status_code for r in replies] == [201] * UPLOADS, [r.text[:120] for r in replies]
    assert len({r.json()["volume_id"] for r in replies}) == UPLOADS
    assert all(r.json()["shape"] == list(volumes[0].shape) and r.json()["bytes"] == size for r in replies)
