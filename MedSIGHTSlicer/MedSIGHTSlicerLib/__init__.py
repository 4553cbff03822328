"""MedSIGHT for 3D Slicer: the engine's HTTP client and its message types (standard library and numpy only).

The MRML-dependent helpers (``geometry``, ``suggestions``, ``export``) import vtk and slicer, so they are imported
as submodules (``from MedSIGHTSlicerLib.suggestions import SuggestionManager``), not from here.
"""

# ruff: noqa: N999 - 3D Slicer names a module's helper package <Module>Lib

from .client import DEFAULT_URL, AskStream, MedSIGHTClient, MedSIGHTError
from .jobs import JobEvent, JobRunner
from .protocol import (
    AskResult,
    CancelResult,
    ErrorInfo,
    Health,
    ModelCard,
    Region,
    SliceAnswer,
    StreamEvent,
    VolumeInfo,
)
from .rle import decode_mask

__all__ = [
    "DEFAULT_URL",
    "AskResult",
    "AskStream",
    "CancelResult",
    "ErrorInfo",
    "Health",
    "JobEvent",
    "JobRunner",
    "MedSIGHTClient",
    "MedSIGHTError",
    "ModelCard",
    "Region",
    "SliceAnswer",
    "StreamEvent",
    "VolumeInfo",
    "decode_mask",
]
