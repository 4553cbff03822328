"""Benchmark evaluation: official-compatible metrics, readers, resumable sharded inference and reports."""

from medsight.evaluate.demo_diagseg import demo_to_diagseg
from medsight.evaluate.metrics import (
    bootstrap_ci,
    closed_hit,
    dice,
    dice_from_logits,
    mc_hit,
    normalize_word,
    open_scores,
    sentence_bleu,
)
from medsight.evaluate.readers import DataError, EvalItem, read_diagseg, read_items, read_llava_vqa, read_omnimed
from medsight.evaluate.report import build_report, write_report
from medsight.evaluate.runner import RunOptions, merge_shards, read_predictions, run_predictions

__all__ = [
    "DataError",
    "EvalItem",
    "RunOptions",
    "bootstrap_ci",
    "build_report",
    "closed_hit",
    "demo_to_diagseg",
    "dice",
    "dice_from_logits",
    "mc_hit",
    "merge_shards",
    "normalize_word",
    "open_scores",
    "read_diagseg",
    "read_items",
    "read_llava_vqa",
    "read_omnimed",
    "read_predictions",
    "run_predictions",
    "sentence_bleu",
    "write_report",
]
