"""Statistics of a comparison over seeds: the difference to the baseline, its interval and its tests
(docs/protocol.md, section Comparing methods over seeds).

Each method is run with a few seeds; a seed's score is one sample of the method's score distribution.
With the same seed, two methods start from identical weights, see the same batches and hold out the same
validation identities, so their scores share the seed's effect: the runs are *paired* by seed, and the
per-seed differences d_i = a_i − b_i carry the comparison (the shared effect cancels in them).

- Summary: the mean and the *sample* standard deviation (ddof = 1) over the seeds.
- Paired comparison (the seeds both methods have, each once): Δ = mean(d), its 95 % Student t interval
  Δ ± t_{0.975, n−1} · s_d / √n, the paired t test (p = 2 · P(T_{n−1} > |Δ| / (s_d / √n))) and an exact
  sign-flip permutation test: under "no difference" each d_i is as likely to be −d_i, so p is the share
  of the 2ⁿ sign patterns whose |Σ ± d_i| reaches the observed |Σ d_i| (Fisher's randomisation test).
  It assumes no distribution, but its smallest two-sided p is 2 / 2ⁿ: it is computed only when that can
  fall below α (n ≥ 6 for α = 0.05), and exactly (two halves of the patterns, matched by sorting) up to
  ``MAX_SIGN_FLIP_PAIRS`` pairs, beyond which the t test alone is used (its normality holds there).
- Unpaired fallback, when fewer than 2 seeds are shared: Welch's t test (unequal variances) on the
  difference of means, with the Welch–Satterthwaite degrees of freedom for its interval and p.
- Several methods are compared with the same baseline, so the chance that one of them looks
  significant by luck grows with their number. Holm's step-down correction keeps that family-wise
  error at α: with the m p-values sorted, p₍ᵢ₎ is multiplied by (m − i + 1), made monotone, capped at 1.

With 3 seeds a test can only detect large effects; "not significant" means "not shown", not "equal".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MAX_SIGN_FLIP_PAIRS = 40  # 2 × 2^20 half-sums: exact in well under a second
PAIRED, WELCH = "paired t", "Welch t"


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std (ddof = 1); nan with a single value
    n: int


def summarize(values: Sequence[float]) -> Summary:
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Summary(mean=float(values.mean()), std=std, n=len(values))


@dataclass(frozen=True)
class Difference:
    """A method minus the baseline: Δ, its interval and tests; ``why_no_test`` says why p is None."""

    test: str  # PAIRED or WELCH
    pairs: int  # seeds paired (0 for Welch)
    delta: float
    low: float | None  # 95 % interval of Δ; None without a test
    high: float | None
    p: float | None  # two-sided t test
    p_sign_flip: float | None  # exact sign-flip test (paired only)
    why_no_test: str | None = None
    why_no_sign_flip: str | None = None


def _t_interval(delta: float, standard_error: float, dof: float) -> tuple[float, float]:
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof)) * standard_error
    return delta - half, delta + half


def sign_flip_min_pairs(alpha: float) -> int:
    """The fewest pairs for which the exact sign-flip test can give p < ``alpha`` (2 / 2ⁿ < α)."""
    return max(1, math.floor(1 - math.log2(alpha)) + 1)


def sign_flip_p_value(differences: Sequence[float]) -> float:
    """Exact two-sided p of the sign-flip test: share of the 2ⁿ sign patterns with |Σ ± d| ≥ |Σ d|.

    The patterns are split into two halves of the pairs; for each left half-sum, the right half-sums
    that reach the threshold are counted by binary search, so the cost is 2^(n/2) log, not 2ⁿ.
    """
    d = np.asarray(differences, dtype=float)
    if d.size > MAX_SIGN_FLIP_PAIRS:
        raise ValueError(f"exact sign-flip test limited to {MAX_SIGN_FLIP_PAIRS} pairs, got {d.size}")
    observed = abs(float(d.sum()))
    # Sums equal to the observed one up to rounding count as reaching it.
    threshold = observed - 1e-9 * float(np.abs(d).sum())
    if threshold <= 0:  # Σ d = 0: every pattern reaches it
        return 1.0
    left, right = _half_sums(d[: d.size // 2]), np.sort(_half_sums(d[d.size // 2 :]))
    # |l + r| ≥ t  ⟺  r ≥ t − l  or  r ≤ −t − l  (disjoint, t > 0)
    at_least = right.size - np.searchsorted(right, threshold - left, side="left")
    at_most = np.searchsorted(right, -threshold - left, side="right")
    return float((at_least.sum() + at_most.sum()) / 2.0**d.size)


def _half_sums(d: np.ndarray) -> np.ndarray:
    """Σ ± d over every sign pattern (2^len(d) values)."""
    sums = np.zeros(1)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def paired_difference(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05) -> Difference:
    """``a`` − ``b`` seed by seed (equal lengths, same seed order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    n, delta = d.size, float(d.mean())
    minimum = sign_flip_min_pairs(alpha)
    why_no_flip = (
        f"n<{minimum}" if n < minimum else f"n>{MAX_SIGN_FLIP_PAIRS}" if n > MAX_SIGN_FLIP_PAIRS else None
    )
    p_flip = None if why_no_flip else sign_flip_p_value(d)
    if n < 2:
        return Difference(PAIRED, n, delta, None, None, None, p_flip, f"{n} pair", why_no_flip)
    if np.ptp(d) == 0:  # every seed moved by the same amount: s_d = 0, t undefined
        return Difference(PAIRED, n, delta, None, None, None, p_flip, "no variance", why_no_flip)
    low, high = _t_interval(delta, float(d.std(ddof=1)) / math.sqrt(n), n - 1)
    p = float(stats.ttest_rel(a, b).pvalue)
    return Difference(PAIRED, n, delta, low, high, p, p_flip, None, why_no_flip)


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Difference of the means of two unpaired samples, Welch's interval and test."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(WELCH, 0, delta, None, None, None, None, "<2 seeds on a side", "unpaired")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Difference(WELCH, 0, delta, None, None, None, None, "no variance", "unpaired")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    low, high = _t_interval(delta, math.sqrt(va + vb), dof)
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Difference(WELCH, 0, delta, low, high, p, None, None, "unpaired")


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input order; None entries are left out of the family."""
    present = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running_max = 0.0
    for rank, (p, index) in enumerate(present):
        running_max = max(running_max, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running_max
    return adjusted
