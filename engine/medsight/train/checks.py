"""Checks of what a user hands the trainer: JSON files, config values (type and range), with errors naming them.

Every failure is a ValueError whose message names the file, the field or item, the value and what is expected, so
`medsight train` prints one line instead of a traceback from deep inside the loop.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

#: Non-finite numbers are never a setting (JSON itself has none; Python's json module reads NaN and Infinity).
_FIELD_CONFIG = ConfigDict(allow_inf_nan=False)
#: A range rule: predicate on the (already type-checked) value, and the expectation the error states.
Limit = tuple[Callable[[Any], bool], str]


def json_kind(value: Any) -> str:
    """How JSON spells the type of a decoded value (for messages)."""
    kinds = ((bool, "true/false"), (int, "number"), (float, "number"), (str, "string"), (list | tuple, "list"),
             (dict, "object"), (type(None), "null"))
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


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
    """`value` (decoded JSON) as the dataclass field type `hint`, or a ValueError naming field, value and why.

    pydantic does the validation, in its lax JSON mode: a list becomes a tuple, 1e3 an int, "1e-4" a float (the value
    is unambiguous); a fraction for an int, a word for a number and non-finite numbers are refused."""
    if isinstance(value, bool) and hint is not bool:
        # Lax mode reads true as 1: a learning rate of 1.0 from `"lr": true` would be a silent, ruinous setting.
        expected = getattr(hint, "__name__", hint)
        raise ValueError(f"field {name!r} is {json.dumps(value)} (true/false): expected {expected}")
    try:
        return TypeAdapter(hint, config=_FIELD_CONFIG).validate_json(json.dumps(value))
    except ValidationError as err:
        first = err.errors()[0]
        where = f" (item {', '.join(map(str, first['loc']))})" if first["loc"] else ""
        raise ValueError(f"field {name!r} is {json.dumps(value, default=str)} ({json_kind(value)}): "
                         f"{first['msg']}{where}") from None


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
