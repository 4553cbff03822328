"""MedSIGHT: medical visual question answering with region-code segmentation."""

from medsight.answer import Answer, Region
from medsight.config import MedSIGHTConfig, get_preset
from medsight.model.generation import GenerationOptions
from medsight.model.loading import load_model, save_pretrained
from medsight.model.medsight import ImageOptions, MedSIGHTModel

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "GenerationOptions",
    "ImageOptions",
    "MedSIGHTConfig",
    "MedSIGHTModel",
    "Region",
    "get_preset",
    "load_model",
    "save_pretrained",
]
