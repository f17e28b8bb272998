"""Declarative parameter checks with one error template.

Every failure reads ``The 'x' parameter of Y must be <constraint>. Got <value> instead.`` (the
scikit-learn ``_param_validation`` wording) and is a :class:`~medscalpel.errors.ConfigError`.
A constraint is data (:class:`Interval`, :class:`OneOf`) so that a caller can declare its
parameters in a table and check them all with :func:`check_params`; the functions
:func:`check_range`, :func:`check_in` and :func:`check_fraction` are the same checks called
one by one. NumPy scalars count as the numbers they hold (``np.int64(3)`` is an integer).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from medscalpel.errors import ConfigError


def _fail(name: str, owner: str, must: str, got: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of {owner} must be {must}. Got {got!r} instead.")


def _is_bool(value: Any) -> bool:
    # bool is an int subclass and numpy's bool_ is not a Number: neither is a number here
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (for the message), else the value."""
    is_scalar = type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0
    return value.item() if is_scalar else value


@dataclass(frozen=True)
class Interval:
    """A number in ``[low, high]`` (either end open or absent); ``integer`` asks for an int."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_inclusive: bool = True
    high_inclusive: bool = True

    def span(self) -> str:
        """The interval alone: ``'[0, 10]'``, ``'(0, inf)'``."""
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _num(self.low)
        hi = "inf)" if self.high is None else _num(self.high) + ("]" if self.high_inclusive
                                                                 else ")")
        return f"{lo}, {hi}"

    def describe(self) -> str:
        """``'an integer in the range [0, 10]'`` / ``'a number in the range (0, inf)'``."""
        return f"{'an integer' if self.integer else 'a number'} in the range {self.span()}"

    def check(self, value: Any, name: str, owner: str) -> Any:
        ok_type = isinstance(value, numbers.Integral) if self.integer else \
            isinstance(value, numbers.Real)
        if _is_bool(value) or not ok_type or (not self.integer and not math.isfinite(value)):
            raise _fail(name, owner, self.describe() if self.integer else
                        f"a finite number ({self.describe()})", _plain(value))
        if self.low is not None and (value < self.low
                                     or (not self.low_inclusive and value == self.low)):
            raise _fail(name, owner, self.describe(), _plain(value))
        if self.high is not None and (value > self.high
                                      or (not self.high_inclusive and value == self.high)):
            raise _fail(name, owner, self.describe(), _plain(value))
        return value


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    values: tuple

    def span(self) -> str:
        """The values alone: ``'1, 3'``."""
        return ", ".join(str(o) for o in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.values)

    def check(self, value: Any, name: str, owner: str) -> Any:
        if _is_bool(value) or _plain(value) not in self.values:
            raise _fail(name, owner, self.describe(), _plain(value))
        return value


Constraint = Union[Interval, OneOf]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_params(values: Mapping[str, Any], constraints: Mapping[str, Constraint],
                 owner: str) -> None:
    """Check every ``values[name]`` that has a constraint (``None`` means not given; a list or
    tuple is checked item by item); the first violation raises its ConfigError."""
    for name, constraint in constraints.items():
        value = values.get(name)
        if value is None:
            continue
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            constraint.check(item, name, owner)


def check_in(value: Any, name: str, owner: str, options: Iterable[Any]) -> Any:
    return OneOf(tuple(options)).check(value, name, owner)


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
    return Interval(low, high, integer, low_inclusive, high_inclusive).check(value, name, owner)


def check_fraction(value: Any, name: str, owner: str, *, allow_one: bool = False) -> float:
    return float(check_range(value, name, owner, 0.0, 1.0, high_inclusive=allow_one))
