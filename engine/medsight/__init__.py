"""MedSIGHT: medical visual question answering with region-code segmentation."""

from medsight._version import __version__
from medsight.answer import Answer, Region
from medsight.config import MedSIGHTConfig, get_preset
from medsight.engine import Engine
from medsight.model.generation import GenerationOptions
from medsight.model.loading import load_model, save_pretrained
from medsight.model.medsight import ImageOptions, MedSIGHTModel

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
