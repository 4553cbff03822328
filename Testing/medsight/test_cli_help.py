"""`--help` of the `medsight` commands: every option says what it does, and one that has a default names it, so a
user need not read the code to learn what an option left out means (e.g. `eval --resize-mode`'s crop, where `ask`
letterboxes). `serve` is left to its own tests."""

from __future__ import annotations

import argparse

import pytest

from medsight.cli import _parser
from medsight.evaluate.cli import parser as eval_parser
from medsight.train.cli import merge_parser, plan_parser
from medsight.train.cli import parser as train_parser

#: Subcommands of `medsight` whose own parser holds their options (train and eval hand theirs on).
CHECKED = ("ask", "export-onnx", "info", "download")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {**{name: sub.choices[name] for name in CHECKED}, "eval": eval_parser(), "train": train_parser(),
            "train plan": plan_parser(), "train merge": merge_parser()}


def _has_default(action: argparse.Action) -> bool:
    """An option whose absence means a value: not a flag, not "none", not required."""
    return (action.option_strings and not action.required and action.nargs != 0
            and action.default not in (None, argparse.SUPPRESS, []))


@pytest.mark.parametrize("name", [*CHECKED, "eval", "train", "train plan", "train merge"])
def test_every_option_has_help_naming_its_default(name):
    p = _parsers()[name]
    formatter = p._get_formatter()
    undocumented, default_unnamed = [], []
    for action in p._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if not action.help:
            undocumented.append(action.dest)
            continue
        text = formatter._expand_help(action)
        if _has_default(action) and "default" not in text:
            default_unnamed.append(f"{action.option_strings[0]} (default {action.default!r}): {text!r}")
    assert undocumented == [] and default_unnamed == [], (name, undocumented, default_unnamed)
    assert len([a for a in p._actions if a.option_strings]) > 1  # the parser's options were read
