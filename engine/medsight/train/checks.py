"""Checks of what a user hands the trainer: JSON files, config values (type and range), with errors naming them.

Every failure is a ValueError whose message names the file, the field or item, the value and what is expected, so
`medsight train` prints one line instead of a traceback from deep inside the loop.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from medsight.user_files import read_user_text

#: A range rule: predicate on the (already type-checked) value, and the expectation the error states.
Limit = tuple[Callable[[Any], bool], str]


def json_kind(value: Any) -> str:
    """How JSON spells the type of a decoded value (for messages)."""
    kinds = ((bool, "true/false"), (int, "number"), (float, "number"), (str, "string"), (list | tuple, "list"),
             (dict, "object"), (type(None), "null"))
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def read_json_file(path: str | Path, what: str) -> Any:
    """The decoded JSON of `path`; a missing, unreadable or malformed file is a ValueError naming it and `what`."""
    text = read_user_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} is not valid JSON ({err})") from None


def unknown_fields(given: Iterable[str], known: Iterable[str]) -> list[str]:
    """Each unknown name, with the closest known one when there is a near match (typos such as max_step)."""
    known = sorted(known)
    out = []
    for name in sorted(set(given) - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def _bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"field {name!r} is {json.dumps(value, default=str)} ({json_kind(value)}); expected {expected}")


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` (decoded JSON) as the dataclass field type `hint`, or a ValueError naming field, value and type.

    JSON has no tuples (lists become tuples) and writes 1e3 as a float (an integral float is taken as an int).
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise _bad(name, value, "one of " + ", ".join(json.dumps(a) for a in args))
    if origin is tuple:
        return _coerce_tuple(name, value, args)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _bad(name, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(name, value, "an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _bad(name, value, "a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _bad(name, value, "a string")
    return value


def _coerce_tuple(name: str, value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    variable = len(args) == 2 and args[1] is Ellipsis
    if not isinstance(value, list | tuple) or (not variable and len(value) != len(args)):
        what = "a list" if variable else f"a list of {len(args)} values"
        raise _bad(name, value, what)
    kinds = [args[0]] * len(value) if variable else list(args)
    return tuple(coerce(f"{name}[{i}]", v, k) for i, (v, k) in enumerate(zip(value, kinds, strict=True)))


def check_limits(values: dict[str, Any], limits: dict[str, Limit]) -> None:
    """Raise a ValueError for the first field outside its range."""
    for name, (ok, expected) in limits.items():
        if name in values and not _passes(ok, values[name]):
            raise _bad(name, values[name], expected)


def _passes(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except TypeError:  # a value of the wrong type set in code (JSON values are type-checked before)
        return False


# Range rules shared by the config classes (written once so the messages read the same everywhere).
def at_least(low: float, kind: str = "an integer", note: str = "") -> Limit:
    return (lambda v: v >= low), f"{kind} >= {low:g}" + (f" ({note})" if note else "")


def positive() -> Limit:
    return (lambda v: v > 0), "a number > 0"


def fraction(closed_top: bool = True) -> Limit:
    top = "1" if closed_top else "1 (excluded)"
    return (lambda v: 0 <= v <= 1 if closed_top else 0 <= v < 1), f"a number from 0 to {top}"


def one_of(*choices: str) -> Limit:
    return (lambda v: v in choices), "one of " + ", ".join(json.dumps(c) for c in choices)
