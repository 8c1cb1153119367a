"""Checks of the numbers calibration takes (levels, targets, rates), with messages that say what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any


def number_rule(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> str:
    """The rule [`check_number`] enforces, in words: `"in [0, 1]"`, `"> 0"` or `"a finite number"`."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return "a finite number"


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """Returns `value` as a float when it is a finite real number within the bounds, else raises a `ValueError`.

    Args:
        name: The parameter's name in the message (e.g. `"max_drop"`).
        value: The value to check; booleans, strings, NaN and infinities are refused.
        low: Lower bound, or None.
        high: Upper bound, or None.
        low_open: Whether `low` itself is excluded.
        high_open: Whether `high` itself is excluded.
        meaning: What the parameter is, for the message (e.g. `"a fraction of samples"`).

    Returns:
        The value as a Python float.
    """
    description = f"{name} must be {number_rule(low, high, low_open, high_open)}" + (
        f" ({meaning})" if meaning else ""
    )
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{description}, got {value!r} of type {type(value).__name__}.")
    number = float(value)
    if (
        not math.isfinite(number)
        or (low is not None and (number <= low if low_open else number < low))
        or (high is not None and (number >= high if high_open else number > high))
    ):
        raise ValueError(f"{description}, got {value!r}.")
    return number


def check_confidence_level(confidence_level: Any) -> float:
    """Returns `confidence_level` as a float when it lies in (0, 1), else raises a `ValueError` that says so."""
    return check_number(
        "confidence_level", confidence_level, 0.0, 1.0, low_open=True, high_open=True, meaning="e.g. 0.95"
    )


__all__ = ["check_confidence_level", "check_number", "number_rule"]
