"""Checks of user-given numbers and Hub names, with the errors every part of the package raises for them."""

from __future__ import annotations

import math
import re
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


# A Hub repository id: "owner/name" (letters, digits, "-", "_", "."; neither part starting with a separator).
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_base_model(base_model) -> str | None:
    """`base_model` if it is `None` or looks like a Hub model id (``"owner/name"``), else a `ValueError`.

    A model card's `base_model` metadata names a Hub repository; a local folder or a bare name cannot go there.
    """
    if base_model is None:
        return None
    if not isinstance(base_model, str) or not HUB_REPO_ID.match(base_model) or any(
            bad in base_model for bad in ("--", "..")):
        raise ValueError("base_model must be a Hub model id such as 'CompVis/stable-diffusion-v1-4' (owner/name), got "
                         f"{base_model!r}: the model card's metadata links to it on the Hub")
    return base_model


def check_license(license) -> str | None:
    """`license` if it is `None` or a licence id (``"mit"``, ``"creativeml-openrail-m"``, ``"other"``...), else a
    `ValueError`."""
    if license is None:
        return None
    if not isinstance(license, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ValueError(f"license must be a Hub licence id such as 'creativeml-openrail-m', 'openrail++' or 'mit' "
                         f"(lower case, no spaces), got {license!r}")
    return license
