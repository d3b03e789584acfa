"""Integers and reals given as arguments: Python's, NumPy's, one-element tensors; never a bool.

Every public function that takes an id, a count, a size or a step reads it through `as_int`, so 2.5 is not
truncated and a flag is not taken for 1: a Python bool, a NumPy bool (which NumPy < 2.3 still lets
``operator.index`` read as 0 or 1, with a DeprecationWarning) or a bool tensor is refused alike.
"""

from __future__ import annotations

import numbers
import operator
import sys

import torch


def is_bool(value: object) -> bool:
    """Whether `value` is a Python bool, a NumPy bool scalar or a bool tensor."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return True
    np = sys.modules.get("numpy")  # a NumPy bool exists only where NumPy was imported
    return np is not None and isinstance(value, np.bool_)


def strict_index(value: object) -> int:
    """``operator.index(value)`` (ints, NumPy integers, one-element integer tensors), refusing bools (Python, NumPy
    or tensor): ids, counts and steps are integers, not flags.

    Raises:
        TypeError: a bool or a value without an exact integer value (floats, strings, ...).
    """
    if is_bool(value):
        raise TypeError(f"{value!r} is a bool")
    return operator.index(value)


def as_int(value: object) -> int | None:
    """`strict_index(value)`, or None where it refuses the value (a bool, a float, a many-element tensor)."""
    try:
        return strict_index(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def as_real(value: object) -> float | None:
    """`value` as a Python float if it is a real number (int, float, NumPy scalar, one-element non-bool tensor; not
    a bool), else None."""
    if is_bool(value):
        return None
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    return float(value) if isinstance(value, numbers.Real) else None
