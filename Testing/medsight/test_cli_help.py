"""`--help` of the `medsight` commands: every option says what it does, and one that has a default names it, so a
user need not read the code to learn what an option left out means (e.g. `eval --resize-mode`'s crop, where `ask`
letterboxes)."""

from __future__ import annotations

import argparse

import pytest

from medsight.cli import _parser
from medsight.evaluate.cli import parser as eval_parser
from medsight.train.cli import merge_parser, plan_parser
from medsight.train.cli import parser as train_parser

#: Subcommands of `medsight` whose own parser holds their options (train and eval hand theirs on).
CHECKED = ("ask", "serve", "export-onnx", "info", "download")


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


def test_train_help_lists_every_config_field_with_its_default():
    """`--config` takes fields no option names (grad_accum, warmup_ratio, lora_r, init_from's default "tiny": random
    weights ...): `medsight train --help` lists each stage's, with the default a field left out keeps."""
    import dataclasses
    import json

    from medsight.train.stages import RECIPES, STAGE_CONFIGS

    text = train_parser().format_help()
    flat = " ".join(text.split())  # the list is wrapped
    kinds = {**{f"stage{n}": k for n, k in STAGE_CONFIGS.items()}, **{n: k for n, (_, k) in RECIPES.items()}}
    starts = [flat.rindex(f" {name}: ") for name in kinds]  # each list runs to the next (the last "lora: ")
    assert starts == sorted(starts)
    missing = []
    for (name, kind), start, end in zip(kinds.items(), starts, [*starts[1:], len(flat)], strict=True):
        for f in dataclasses.fields(kind):
            entry = f"{f.name}={json.dumps(getattr(kind(), f.name))}"
            if entry not in flat[start:end]:
                missing.append(f"{name} {entry}")
    assert missing == [], missing
    assert sum(len(dataclasses.fields(k)) for k in kinds.values()) > 6 * 20  # every stage's fields were looked for
