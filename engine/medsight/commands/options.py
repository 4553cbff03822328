"""Checks of options that several commands share, made before any model is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path


def file_name(text: str) -> str:
    """argparse type: a file or folder name, never empty. An empty one (`--out "$UNSET"`) was taken as not given:
    no segmentation, overlay or audit log was written and the command still succeeded; export-onnx wrote into the
    current folder, `eval --report ""` its report, and `eval --adapter ""` answered without the adapter while its
    report named one."""
    if not text:
        raise argparse.ArgumentTypeError("an empty name: give a file or folder")
    return text


def path_name(text: str) -> Path:
    """argparse type: `file_name`'s check (never empty) as a Path; `Path("")` is the current folder, so an output
    folder given as `"$UNSET"` (`train --out`, the demo scripts' out_dir and --report) wrote wherever the command was
    started."""
    return Path(file_name(text))


def check_vision_file(args: argparse.Namespace) -> None:
    """load_model reads a vision file only for a model in the official release layout: refuse one it would ignore."""
    if not args.vision_file:
        return
    from medsight.config import PRESETS
    from medsight.model.checkpoints import CONFIG_FILE
    from medsight.model.loading import EMBEDDED

    model = str(args.model)
    if model in EMBEDDED or model in PRESETS or (Path(model).expanduser() / CONFIG_FILE).is_file():
        raise ValueError(f"--vision-file {args.vision_file}: --model {model} does not use a vision file (only a "
                         "model in the official release layout does)")
