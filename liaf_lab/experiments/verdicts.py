"""Paired comparisons of methods over seeds, and verdicts that hold for a whole family of them.

A study compares methods by their paired difference on each seed (same initial weights and batches).
With many comparisons, a per-comparison 95% interval excludes 0 by chance somewhere in the family far
more often than 5% of the time (twelve null comparisons: 1 - 0.95**12 = 46%). ``compare_family``
therefore gives each comparison its paired Student's t interval and p-value *and* the Holm-adjusted
p-value over the family (Holm 1979, which controls the family-wise error rate at 5% under any
dependence between the comparisons), and the verdict follows the adjusted value.

Fixed-width intervals by design: ``stein_sample_size`` is Stein's two-stage rule (Stein 1945): from the
spread ``s0`` of a pilot of ``n0`` seeds, ``n = max(n0, ceil((t_{n0-1} s0 / D)^2))`` seeds give the
interval ``mean_n +- t_{n0-1} s0 / sqrt(n)`` (half-width <= D) with coverage >= 95% for normal
differences, because the second-stage seeds are independent of ``s0``. The rule looks at the pilot's
spread only, never at a mean or a p-value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of paired differences and its Student's t confidence interval ``(mean, low, high)``.

    With one difference the interval is ``(-inf, inf)``: one seed cannot bound anything.
    """
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(n - 1, level) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student's t critical value ``t_{df}(0.5 + level / 2)``."""
    return float(stats.t.ppf(0.5 + level / 2, df))


def separable_ratio(family_size: int, pilot: int, level: float = LEVEL) -> float:
    """How many of its interval's half-widths a difference must be for Stein's test (``pilot - 1`` degrees of
    freedom) to pass Holm's first step over ``family_size`` comparisons:
    ``t_{pilot-1}(1 - (1 - level) / (2 m)) / t_{pilot-1}((1 + level) / 2)``. A small pilot in a large family makes
    it large: 3 seeds and 29 comparisons give about 5.6, 5 seeds about 2.7."""
    df = pilot - 1
    return t_quantile(df, 1 - (1 - level) / family_size) / t_quantile(df, level)


def format_p(p: float) -> str:
    """A p-value to 3 significant digits, or more where 3 would round one below the 5% threshold up onto it
    (0.04997 is written 0.04997, not 0.05, so the text agrees with the verdict it decides)."""
    digits = 3
    while p < ALPHA - 1e-12 and float(f"{p:.{digits}g}") >= ALPHA - 1e-12 and digits < 12:
        digits += 1
    return f"{p:.{digits}g}"


def t_pvalue(statistic: float, df: int) -> float:
    """Two-sided p-value of a Student's t statistic with ``df`` degrees of freedom."""
    if math.isnan(statistic):
        return 1.0
    return float(2 * stats.t.sf(abs(statistic), df))


def paired_t_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t test of mean 0 (``scipy.stats.ttest_1samp``'s value).

    One difference gives 1.0 (no test); differences without spread give 0.0 if their mean is not 0 and
    1.0 if it is (the limits of the t statistic), where scipy would answer NaN.
    """
    n = len(diffs)
    if n < 2:
        return 1.0
    sd, mean = statistics.stdev(diffs), statistics.fmean(diffs)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return t_pvalue(mean / (sd / math.sqrt(n)), n - 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, ``p_(i)`` (``i`` = 1..m) becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting
    every hypothesis whose adjusted value is below alpha controls the family-wise error rate at alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_interval(diffs: Sequence[float], seed: int = 0, resamples: int = 10_000,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference (``scipy.stats.bootstrap``, resampling
    seeds with replacement), drawn from a generator seeded by ``seed`` so that it reproduces.

    Fewer than two differences, or differences without spread, give the degenerate interval.
    """
    if len(diffs) < 2:
        return -math.inf, math.inf
    if len(set(diffs)) == 1:
        return float(diffs[0]), float(diffs[0])
    res = stats.bootstrap((np.asarray(diffs, dtype=float),), np.mean, n_resamples=resamples,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def stein_sample_size(pilot: Sequence[float], half_width: float, level: float = LEVEL) -> int:
    """Stein's two-stage sample size: seeds needed for a ``level`` interval of half-width ``half_width``.

    ``n = max(n0, ceil((t_{n0-1} s0 / D)^2))`` from the pilot's ``n0`` differences and their standard
    deviation ``s0``. Raises ``ValueError`` for fewer than two pilot values or ``half_width <= 0``.
    """
    n0 = len(pilot)
    if n0 < 2:
        raise ValueError(f"Stein's rule needs a pilot of at least 2 seeds, got {n0}")
    if not half_width > 0:
        raise ValueError(f"the target half-width must be > 0, got {half_width}")
    s0 = statistics.stdev(pilot)
    return max(n0, math.ceil((t_quantile(n0 - 1, level) * s0 / half_width) ** 2 - 1e-9))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison ``a - b`` of a family (AP in percent).

    ``ci_low``/``ci_high``: the per-comparison 95% interval (Student's t; Stein's with ``pilot`` seeds);
    ``p_value``: its two-sided p-value; ``p_holm``: Holm-adjusted over the ``family_size`` comparisons of
    ``family``; ``verdict``: from ``p_holm`` at 5%. ``boot_low``/``boot_high``: a seeded percentile
    bootstrap interval; ``win_fraction``: the share of seeds on which ``a`` is above ``b``.
    """

    family: str
    a: str
    b: str
    split: str
    n: int
    seeds: list[int]
    mean_diff: float
    ci_low: float
    ci_high: float
    half_width: float
    p_value: float
    p_holm: float
    family_size: int
    verdict: str
    boot_low: float
    boot_high: float
    win_fraction: float
    pilot: int | None = None
    target_half_width: float | None = None
    diffs: list[float] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        """The comparison as a flat row (``comparisons.csv`` / ``.json``)."""
        return asdict(self)

    def interval(self) -> str:
        """``"+0.79 [+0.34, +1.24]"``, or the mean alone with one seed."""
        if math.isinf(self.ci_high):
            return f"{self.mean_diff:+.2f} (one seed: no interval)"
        return f"{self.mean_diff:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"

    def sentence(self) -> str:
        """The verdict as a plain sentence, with the family it holds for."""
        if self.n < 2:
            return f"{self.a} − {self.b}: one seed gives no interval; nothing can be said about the difference."
        fam = ("the only comparison of its family (no correction)" if self.family_size == 1 else
               f"Holm-adjusted p = {format_p(self.p_holm)} over a family of {self.family_size} comparisons")
        if self.verdict == "not distinguishable":
            note = ""
            if not self.ci_low <= 0 <= self.ci_high:
                note = "; its own 95% interval excludes 0, but not once the family is accounted for"
            return (f"{self.a} is not distinguishable from {self.b} with {self.n} seeds: {self.interval()} "
                    f"({fam}{note}).")
        return f"{self.a} is {self.verdict} {self.b} with {self.n} seeds: {self.interval()} ({fam})."


def verdict_word(mean_diff: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """``"above"``, ``"below"`` or ``"not distinguishable"`` from the adjusted p-value at ``alpha``."""
    if p_adjusted < alpha:
        return "above" if mean_diff > 0 else "below"
    return "not distinguishable"


@dataclass(frozen=True)
class PairedData:
    """The paired differences ``a - b`` of one comparison over ``seeds`` (in order), and how to bound them:
    with ``pilot`` set, Stein's fixed-width interval (``s0`` from the first ``pilot`` differences)."""

    a: str
    b: str
    seeds: list[int]
    diffs: list[float]
    pilot: int | None = None
    target_half_width: float | None = None


def compare_family(family: str, split: str, pairs: Sequence[PairedData], bootstrap_seed: int = 0) -> list[Comparison]:
    """Every comparison of one family with its interval, p-value and Holm-adjusted verdict.

    A comparison with ``pilot`` uses Stein's statistic ``mean_n sqrt(n) / s0`` with ``pilot - 1`` degrees of
    freedom for both its interval and its p-value; the others the paired t over all their seeds.
    """
    raw = []
    for pair in pairs:
        n, mean = len(pair.diffs), statistics.fmean(pair.diffs)
        if pair.pilot is not None and n >= 2:
            s0 = statistics.stdev(pair.diffs[: pair.pilot])
            half = t_quantile(pair.pilot - 1) * s0 / math.sqrt(n)
            p = (1.0 if mean == 0 else 0.0) if s0 == 0 else t_pvalue(mean * math.sqrt(n) / s0, pair.pilot - 1)
            low, high = mean - half, mean + half
        else:
            mean, low, high = paired_interval(pair.diffs)
            p = paired_t_pvalue(pair.diffs)
        raw.append((pair, mean, low, high, p))
    adjusted = holm([r[4] for r in raw])
    out = []
    for (pair, mean, low, high, p), p_adj in zip(raw, adjusted, strict=True):
        boot = bootstrap_interval(pair.diffs, seed=bootstrap_seed)
        out.append(Comparison(
            family=family, a=pair.a, b=pair.b, split=split, n=len(pair.diffs), seeds=list(pair.seeds),
            mean_diff=mean, ci_low=low, ci_high=high, half_width=(high - low) / 2, p_value=p, p_holm=p_adj,
            family_size=len(pairs), verdict=verdict_word(mean, p_adj) if len(pair.diffs) >= 2 else "one seed",
            boot_low=boot[0], boot_high=boot[1],
            win_fraction=sum(d > 0 for d in pair.diffs) / len(pair.diffs), pilot=pair.pilot,
            target_half_width=pair.target_half_width, diffs=list(pair.diffs)))
    return out
