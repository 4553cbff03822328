"""Trainer state on disk without unpickling arbitrary objects.

Plain data (step, scheduler, optimizer hyper-parameters, RNG states) is JSON. Tensors (the optimizer moments of a
single-process run) go through `torch.load(weights_only=True)`, which only rebuilds tensors and builtin
containers; the RNG states are stored as lists of ints so that nothing else is needed (a numpy array or a
python tuple state would need an allow-list). Sharded runs keep their tensors in `torch.distributed.checkpoint`
folders instead (`medsight.train.fsdp`).
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.atomic_files import replace_file
from medsight.model.checkpoints import CheckpointError
from medsight.user_files import read_user_json


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-able lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path: Path, data: Any) -> None:
    # Atomic: a run killed while saving leaves no torn state file marking its checkpoint complete, so
    # `latest_checkpoint` (which takes a folder by its state file) falls back to the previous checkpoint.
    replace_file(path, lambda target: target.write_text(json.dumps(data)))


def read_json(path: Path) -> Any:
    """A state file's JSON; a missing, unreadable or damaged one is a CheckpointError naming it."""
    return read_user_json(path, "trainer state file", CheckpointError)


def save_tensors(path: Path, data: dict[str, Any]) -> None:
    replace_file(path, lambda target: torch.save(data, target))  # atomic, as write_json


def load_tensors(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: a file holding any other object is refused with a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"trainer state file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        raise CheckpointError(
            f"{path}: refused to unpickle: a trainer state holds only tensors and plain containers. {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable trainer state ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(data).__name__}")
    return data
