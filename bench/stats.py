"""Percentiles and small summaries of latency samples (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def two_standard_errors(values: Sequence[float]) -> float:
    """Twice the standard error of the mean (sample standard deviation over root n); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    centre = mean(values)
    return 2 * math.sqrt(sum((v - centre) ** 2 for v in values) / (n - 1) / n)


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else math.nan
