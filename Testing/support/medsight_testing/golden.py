"""What the golden fixture folder says about its own model, for tests that must not hard-code one fixture set."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from medsight.config import MedSIGHTConfig, get_preset


def golden_base_config(golden: Path) -> MedSIGHTConfig:
    """The `base` that `load_official` needs for the golden weights: what tensor shapes cannot tell.

    The ViT head width (and the image size it was made for, which the loader checks) comes from the fixture's
    open_clip config, the perceiver's head split from `perceiver_heads.json`; every other size is read from the
    checkpoints by the loader itself.
    """
    vit = json.loads((golden / "tiny_vit_openclip_config.json").read_text())
    heads = json.loads((golden / "perceiver_heads.json").read_text())
    full = get_preset("full")
    return replace(
        full,
        name="golden",
        vision=replace(full.vision, head_width=vit["vision_cfg"]["head_width"], quick_gelu=vit["quick_gelu"],
                       image_size=vit["vision_cfg"]["image_size"]),
        perceiver=replace(full.perceiver, heads=heads["heads"], dim_head=heads["dim_head"]),
    )
