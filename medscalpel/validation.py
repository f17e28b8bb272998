"""Declarative parameter checks with one error template."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from medscalpel.errors import ConfigError


def _fail(name: str, owner: str, must: str, got: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of {owner} must be {must}. Got {got!r} instead.")


def check_in(value: Any, name: str, owner: str, options: Iterable[Any]) -> Any:
    opts = list(options)
    if value not in opts:
        raise _fail(name, owner, "one of " + ", ".join(repr(o) for o in opts), value)
    return value


def check_range(
    value: Any,
    name: str,
    owner: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise _fail(name, owner, "an integer" if integer else "a finite number", value)
    lo = "" if low is None else ("[" if low_inclusive else "(") + str(low)
    hi = "" if high is None else str(high) + ("]" if high_inclusive else ")")
    desc = f"in the range {lo or '(-inf'}, {hi or 'inf)'}"
    if low is not None and (value < low or (not low_inclusive and value == low)):
        raise _fail(name, owner, desc, value)
    if high is not None and (value > high or (not high_inclusive and value == high)):
        raise _fail(name, owner, desc, value)
    return value


def check_fraction(value: Any, name: str, owner: str, *, allow_one: bool = False) -> float:
    return float(check_range(value, name, owner, 0.0, 1.0, high_inclusive=allow_one))
