"""Memory stays bounded: an ask over the budget is refused before it starts (with the estimate), and the largest
admitted ask, run twice, leaves the server's resident memory where the first left it (memory is given back)."""

from __future__ import annotations

import time

import httpx
import numpy as np

from medsight.prompt import Message
from medsight.server.admission import estimate_ask_memory, prompt_tokens
from medsight.server.app import create_app
from medsight_testing.arrays import npy
from medsight_testing.live_server import live_server

NPY = {"content-type": "application/octet-stream"}
QUESTION = [{"role": "user", "content": "Please segment the white matter."}]
SLICES, TOKENS = 16, 1024  # before the fix, two such asks grew RSS by 21 % (1470 -> 1774 MiB)


def rss_bytes() -> int:
    """Resident memory of this process (the live server runs in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_budget_refuses_before_start_and_repeated_worst_case_asks_do_not_grow_memory(engine):
    rows, cols = 109, 91  # an MNI-sized axial slice: masks are resampled to it
    volume = np.random.default_rng(11).integers(0, 255, (SLICES + 1, rows, cols)).astype(np.uint8)
    estimate = estimate_ask_memory(engine.model.config, engine.model.dtype, SLICES,
                                   prompt_tokens(engine, [Message("user", QUESTION[0]["content"])]), TOKENS,
                                   rows * cols, engine.model.codes.num_codes)
    app = create_app(engine, model_name="tiny", ask_memory_bytes=estimate.total)  # exactly the worst case fits
    ask = {"volume_id": None, "messages": QUESTION, "options": {"max_new_tokens": TOKENS, "repetition_penalty": 1.0}}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=600) as c:
        ask["volume_id"] = c.post("/v1/volumes", content=npy(volume), headers=NPY).json()["volume_id"]

        over = c.post("/v1/ask", json={**ask, "slices": {"indices": list(range(SLICES + 1))}})
        assert over.status_code == 422 and over.json()["code"] == "over_memory_budget"
        message = over.json()["message"]
        assert "MiB" in message and f"{estimate.total / 1024**2:.0f} MiB per ask" in message, message
        assert not app.state.jobs.history, "refused before any job started"

        after = []
        for _ in range(2):
            r = c.post("/v1/ask", json={**ask, "slices": {"indices": list(range(SLICES))}})
            assert r.status_code == 200, r.text
            answers = r.json()["answers"]
            assert sum(len(a["regions"]) for a in answers) > SLICES * 100  # really the heavy case
            del r, answers  # this process is also the client: measure the server's memory, not the reply's
            time.sleep(0.2)  # the worker hands memory back right after the job
            after.append(rss_bytes())
    print(f"RSS after ask 1: {after[0] / 2**20:.0f} MiB, after ask 2: {after[1] / 2**20:.0f} MiB; "
          f"estimate {estimate.describe()}")
    assert after[1] <= after[0] * 1.10, after
