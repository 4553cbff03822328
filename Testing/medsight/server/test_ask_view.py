"""POST /v1/ask naming its slice by a view: the engine resolves plane and index (real server, tiny model, MNI152)."""

from __future__ import annotations

import json

import httpx
import numpy as np


def _upload(server, mni_upload) -> dict:
    body, params = mni_upload
    reply = httpx.post(f"{server}/v1/volumes", params=params, content=body, timeout=60,
                       headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_ask_by_view_returns_the_slice_it_answered(server, mni_upload):
    info = _upload(server, mni_upload)
    assert set(info["slices"]) == {"axial", "coronal", "sagittal"}  # slice counts per plane for range boxes
    view = np.eye(4)
    view[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # a sagittal view: normal +R
    view[:3, 3] = [7.3, -20.0, 10.0]
    ask = {"volume_id": info["volume_id"], "slices": {"view": view.tolist()},
           "messages": [{"role": "user", "content": "Where is the brain?"}],
           "options": {"max_new_tokens": 4, "seed": 0}}
    reply = httpx.post(f"{server}/v1/ask", json=ask, timeout=120)
    assert reply.status_code == 200, reply.text
    answer = reply.json()["answers"][0]
    s2r = np.array(answer["slice_to_ras"])
    assert answer["plane"] == "sagittal"
    assert abs(s2r[0, 3] - 7.3) <= 1.0 + 1e-9  # within half of the 2 mm voxel
    assert 0 <= answer["index"] < info["slices"]["sagittal"]

    ask["stream"] = True
    with httpx.stream("POST", f"{server}/v1/ask", json=ask, timeout=120) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    job = json.loads(lines[0][5:])
    assert job["plane"] == "sagittal" and job["indices"] == [answer["index"]]


def test_ask_by_view_errors_are_plain(server, mni_upload):
    info = _upload(server, mni_upload)
    base = {"volume_id": info["volume_id"], "messages": [{"role": "user", "content": "Where?"}]}
    outside = np.eye(4)
    outside[2, 3] = 900.0
    cases = [({"view": outside.tolist()}, "invalid_image", "outside"),
             ({"view": [[1, 0], [0, 1]]}, "invalid_request", "4x4"),
             ({"plane": "axial"}, "invalid_request", "indices")]
    for slices, code, words in cases:
        reply = httpx.post(f"{server}/v1/ask", json={**base, "slices": slices}, timeout=60)
        assert reply.status_code == 422 and reply.json()["code"] == code, reply.text
        assert words in reply.json()["message"]
