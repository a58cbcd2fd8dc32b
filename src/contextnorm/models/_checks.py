"""Argument checks shared by the model constructors and placements."""

from __future__ import annotations

import operator


def as_integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python or NumPy), else None.

    Booleans count as non-integers: ``True`` in a size or index is a config mistake, not 1.
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def require_positive_int(name: str, value: object) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= 1."""
    number = as_integer(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def require_probability(name: str, value: float) -> float:
    """``value`` unchanged, or a ValueError naming ``name`` unless 0 <= value < 1."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value
