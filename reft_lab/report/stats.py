"""Means with 95% t-intervals and Welch's test: the statistics of every report table and figure."""

from __future__ import annotations

import math

# two-sided 95% t quantiles by degrees of freedom (normal beyond 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: float) -> float:
    """Two-sided 95% Student t quantile, rounding df down (conservative)."""
    below = [k for k in sorted(T95) if k <= max(1, math.floor(df))]
    return 1.96 if df > 30 else T95[below[-1]]


def _var(values: list[float], mean: float) -> float:
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t confidence interval (None for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, t95(n - 1) * math.sqrt(_var(values, mean) / n)


def differs(a: list[float], b: list[float]) -> bool | None:
    """Welch's 95% interval for mean(a) − mean(b) excludes 0; None when either has n < 2."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va, vb = _var(a, ma) / len(a), _var(b, mb) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma != mb
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0) or 1e-300)
    return abs(ma - mb) > t95(df) * se


def ratio_ci(a: list[float], b: list[float]) -> tuple[float, float | None] | None:
    """mean(a) / mean(b) and the half-width of its 95% interval by the delta method (relative
    variances add; Welch-Satterthwaite degrees of freedom). None when mean(b) ≤ 0 (no ratio); no
    half-width when either has n < 2."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if mb <= 0:
        return None
    ratio = ma / mb
    if len(a) < 2 or len(b) < 2:
        return ratio, None
    terms = [_var(a, ma) / len(a) / mb ** 2, ratio ** 2 * _var(b, mb) / len(b) / mb ** 2]  # var(ma)/mb², R²·var(mb)/mb²
    variance = sum(terms)
    if variance == 0:
        return ratio, 0.0
    df = variance ** 2 / (terms[0] ** 2 / (len(a) - 1) + terms[1] ** 2 / (len(b) - 1))
    return ratio, t95(df) * math.sqrt(variance)
