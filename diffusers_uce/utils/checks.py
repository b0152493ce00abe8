"""Checks of user-given numbers, with the errors every part of the package raises for them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_finite_number(value, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether `value` is a finite number of `kind` (a `bool` is not a number here)."""
    return not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)


def is_whole_number(value, minimum: int = 0) -> bool:
    """Whether `value` is an `int` (not a `bool`) of at least `minimum`."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def finite_number(value, name: str) -> float:
    """`value` as a float; a `TypeError` naming `name` unless it is a finite number."""
    if not is_finite_number(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def non_negative_number(value, name: str, positive: bool = False) -> float:
    """`value` as a float; a `TypeError` unless it is a number, a `ValueError` unless it is finite and ``>= 0``
    (``> 0`` when `positive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return value


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite, with one reduction each (NaN and inf carry through
    ``aminmax``): several times faster than ``torch.isfinite(t).all()``, which first builds a mask of the tensor."""
    return all(t.numel() == 0 or all(math.isfinite(x.item()) for x in t.aminmax()) for t in tensors)
