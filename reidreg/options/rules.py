"""What an option accepts, and in words what is allowed: ``integer(min=1)`` → "an integer >= 1".

Rules are plain values shared by the command tables (``reidreg.options.tables``) and each regularizer's
``OPTION_RULES``; ``show`` writes a value back as the user typed it, for the one-line error
``data.num_identities='eight': expected an integer >= 1``. Standard library only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What an option accepts (``accepts(value)``) and, in words, what is allowed (``expected``)."""

    accepts: Callable[[Any], bool]
    expected: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(gt: Any = None, ge: Any = None, lt: Any = None, le: Any = None) -> str:
    low = (f"({gt}" if gt is not None else f"[{ge}") if gt is not None or ge is not None else None
    high = (f"{lt})" if lt is not None else f"{le}]") if lt is not None or le is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" > {gt}" if gt is not None else f" >= {ge}"
    if high:
        return f" < {lt}" if lt is not None else f" <= {le}"
    return ""


def _in_range(value: Any, gt: Any = None, ge: Any = None, lt: Any = None, le: Any = None) -> bool:
    return (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    )


def integer(*, min: int | None = None, max: int | None = None) -> Rule:  # noqa: A002 (reads as the rule)
    """An int (not a bool, not 4.0) in [min, max]."""
    return Rule(
        lambda value: _is_int(value) and _in_range(value, ge=min, le=max),
        f"an integer{_range_text(ge=min, le=max)}",
    )


def number(
    *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Rule:
    """A finite int or float (not a bool) in the given range."""
    return Rule(
        lambda value: _is_number(value) and _in_range(value, gt=gt, ge=ge, lt=lt, le=le),
        f"a number{_range_text(gt=gt, ge=ge, lt=lt, le=le)}",
    )


def boolean() -> Rule:
    return Rule(lambda value: isinstance(value, bool), "true or false")


def string() -> Rule:
    return Rule(lambda value: isinstance(value, str) and value.strip() != "", "a non-empty string")


def choice(*values: Any) -> Rule:
    """One of ``values``, of the same type (``32`` and ``"32"`` are different entries; ``false`` is not 0)."""
    return Rule(
        lambda value: any(type(value) is type(allowed) and value == allowed for allowed in values),
        "one of " + ", ".join(dict.fromkeys(str(v) for v in values)),
    )


def optional(rule: Rule) -> Rule:
    """null or what ``rule`` accepts."""
    return Rule(lambda value: value is None or rule.accepts(value), f"null or {rule.expected}")


def any_of(*rules: Rule, expected: str | None = None) -> Rule:
    """What any of ``rules`` accepts; ``expected`` replaces the joined descriptions."""
    return Rule(
        lambda value: any(rule.accepts(value) for rule in rules),
        expected or " or ".join(rule.expected for rule in rules),
    )


def list_of(item: Rule, *, length: int | None = None, increasing: bool = False) -> Rule:
    """A list of items that ``item`` accepts; of ``length`` items; strictly increasing."""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, list | tuple)
            and all(item.accepts(v) for v in value)
            and (length is None or len(value) == length)
            and (not increasing or all(a < b for a, b in zip(value, value[1:], strict=False)))
        )

    size = f"{length} " if length is not None else ""
    order = "strictly increasing " if increasing else ""
    return Rule(accepts, f"a list of {size}{order}items, each {item.expected}")


def mapping() -> Rule:
    return Rule(lambda value: isinstance(value, Mapping), "a mapping (key: value)")


def file_name(*suffixes: str) -> Rule:
    """A path whose name ends in one of ``suffixes`` (``features.npz``)."""
    return Rule(
        lambda value: string().accepts(value) and PurePath(value).suffix in suffixes,
        "a file named " + " or ".join(f"<file>{suffix}" for suffix in suffixes),
    )


def show(value: Any) -> str:
    """A value as the user would type it: null, true, 'text', -0.001, [40, 70]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def raise_if_any(problems: list[str]) -> None:
    """One ``ConfigError``: the problem, or ``N invalid options:`` and one indented line per problem."""
    from reidreg.errors import ConfigError

    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} invalid options:\n  " + "\n  ".join(problems))


def unknown_option(key: str, known: list[str]) -> str:
    """``unknown option <key>; did you mean <closest known key>?`` (difflib), or without a suggestion."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown option {key}; did you mean {close[0]}?" if close else f"unknown option {key}"
