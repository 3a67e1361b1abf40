"""Hyperparameter checks shared by AdaptOpt, the registry and the schedules.

Every error names the parameter, the bad value and the valid range, in torch's style
("Invalid beta parameter at index 0: 1.2 (must be in [0, 1))").
"""
from __future__ import annotations

import math


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (must be a number {bound})")


def check_nonneg(name: str, value, *, upper: float | None = None) -> None:
    ok = _is_number(value) and value >= 0 and (upper is None or value <= upper)
    if not ok:
        valid = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {valid})")


def check_range(name: str, value, low: float, high: float, valid: str) -> None:
    """low <= value < high, described as ``valid`` in the message."""
    if not (_is_number(value) and low <= value < high):
        raise ValueError(f"Invalid {name}: {value!r} (must be in {valid})")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2), each in [0, 1))")
    for i, beta in enumerate(betas):
        if not (_is_number(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")


def check_gamma(gamma) -> None:
    if not (_is_number(gamma) and 0.0 < gamma <= 1.0):
        raise ValueError(f"Invalid gamma: {gamma!r} (the exponential decay factor must be in (0, 1])")
