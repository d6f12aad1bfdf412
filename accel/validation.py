"""Checks for user-given values, with messages that name the owner, the argument, the value and what is allowed."""

from __future__ import annotations

import math
import numbers


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_real(owner: str, name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number (a Python or NumPy scalar, not a bool, a string or a tensor) within [minimum, maximum]."""
    bounds = " and ".join(b for b in (minimum is not None and f">= {minimum}", maximum is not None and f"<= {maximum}") if b)
    allowed = f"a finite real number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be {allowed}, got {_describe(value)}")
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value, minimum: int = 0) -> int:
    """An integer (not a bool, a float or a string) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {_describe(value)}")
    return value
