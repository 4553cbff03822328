"""Checkpoints shaped like the released UniMed-CLIP file, pickled with the globals that file names.

The real `unimed_clip_vit_l14_base_text_encoder.pt` is an open_clip training checkpoint written under numpy 1:
`{epoch, name, state_dict: {module.visual.*, module.text_encoder.*, ...}, optimizer: {state, param_groups}, ...}`
with a numpy float in it; the Hub's pickle scan lists `_codecs.encode`, `numpy.core.multiarray.scalar`,
`torch.FloatStorage`, `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and `numpy.dtype`.
numpy 2 (installed here) would write `numpy._core.multiarray.scalar`; `Numpy1Pickler` writes numpy 1's name.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

NUMPY1_MODULES = {"numpy._core.multiarray": "numpy.core.multiarray"}


class Numpy1Pickler(pickle._Pickler):
    """The pure-Python pickler (torch.save subclasses it to add persistent ids), writing numpy 1 module names."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module in NUMPY1_MODULES:
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{NUMPY1_MODULES[module]}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


# What torch.save needs of a pickle module: a module with a Pickler.
NUMPY1_PICKLE = ModuleType("numpy1_pickle")
NUMPY1_PICKLE.Pickler = Numpy1Pickler


def save_like_numpy1(obj, path: Path) -> Path:
    torch.save(obj, path, pickle_module=NUMPY1_PICKLE, pickle_protocol=2)
    return path


def pickled_globals(path: Path) -> set[str]:
    """The GLOBAL names the checkpoint's pickle really holds, read with pickletools (not by unpickling)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def unimed_clip_checkpoint(visual: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> dict:
    """The open_clip training-checkpoint layout: DDP `module.` keys, an Adam optimizer state, a numpy float."""
    state = OrderedDict([*((f"module.visual.{k}", v) for k, v in visual.items()),
                         *((f"module.text_encoder.{k}", v) for k, v in text.items())])
    params = list(state.values())
    optimizer = {
        "state": {i: {"step": torch.tensor(float(1000)), "exp_avg": torch.zeros_like(p),
                      "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
        "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2,
                          "params": list(range(len(params)))}],
    }
    return {"epoch": 10, "name": "unimed_clip_vit_l14", "state_dict": state, "optimizer": optimizer,
            "best_zero_shot": np.float64(0.7321)}
