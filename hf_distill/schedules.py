"""Schedules for loss weights that change over training (FitNets' curriculum)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def anneal(schedule: str, start: float, end: float, fraction: float) -> float:
    """Value at ``fraction`` (0..1) of the way from ``start`` to ``end``."""
    f = min(max(float(fraction), 0.0), 1.0)
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        return start + (end - start) * f
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * f))
    raise ValueError(f"unknown schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")
