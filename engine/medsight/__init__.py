"""MedSIGHT: medical visual question answering with region-code segmentation.

The public names are imported on first use (PEP 562), not with the package: the `medsight` command imports
`medsight.cli`, and importing torch and the model here (seconds) ran before the command could turn Ctrl+C into
"medsight: interrupted" (it printed a traceback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medsight._version import __version__

if TYPE_CHECKING:
    from medsight.answer import Answer, Region
    from medsight.config import MedSIGHTConfig, get_preset
    from medsight.engine import Engine
    from medsight.model.generation import GenerationOptions
    from medsight.model.loading import load_model, save_pretrained
    from medsight.model.medsight import ImageOptions, MedSIGHTModel

#: Each public name and the module it lives in.
_PUBLIC = {
    "Answer": "medsight.answer",
    "Region": "medsight.answer",
    "MedSIGHTConfig": "medsight.config",
    "get_preset": "medsight.config",
    "Engine": "medsight.engine",
    "GenerationOptions": "medsight.model.generation",
    "load_model": "medsight.model.loading",
    "save_pretrained": "medsight.model.loading",
    "ImageOptions": "medsight.model.medsight",
    "MedSIGHTModel": "medsight.model.medsight",
}

__all__ = [
    "Answer",
    "Engine",
    "GenerationOptions",
    "ImageOptions",
    "MedSIGHTConfig",
    "MedSIGHTModel",
    "Region",
    "__version__",
    "get_preset",
    "load_model",
    "save_pretrained",
]


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'medsight' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
