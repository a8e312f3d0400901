"""How many paired seeds would make an observed difference decidable: the power of the two-sided paired t
test (a one-sample t test on the per-seed differences), from the noncentral t distribution.

With n pairs, effect size δ = mean(d) / sd(d) (Cohen's d_z) and T = √n · mean(d) / s_d, T follows a
noncentral t with n − 1 degrees of freedom and noncentrality √n · δ (Cohen, "Statistical Power Analysis
for the Behavioral Sciences", 2nd ed., 1988, ch. 2), so the power at level α is

    P(|T| > t_{1−α/2, n−1}) = 1 − F_nct(t_{1−α/2, n−1}) + F_nct(−t_{1−α/2, n−1})   (two-sided).

Assumptions: the paired differences are normal, and the observed δ is taken as the true one. That makes
the figure an optimistic planning estimate (δ from 3 seeds is itself uncertain, and a significant result
from a study sized on it tends to overstate it), not a guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_POWER = 0.8
MAX_PAIRS = 1000  # beyond this the plan only says "more than"


def paired_t_power(*, pairs: int, effect_size: float, alpha: float) -> float:
    """Power of the two-sided paired t test with ``pairs`` pairs when the true d_z is ``effect_size``."""
    dof = pairs - 1
    critical = float(stats.t.ppf(1 - alpha / 2, dof))
    noncentrality = math.sqrt(pairs) * abs(effect_size)
    # F_nct(−c; λ) = 1 − F_nct(c; −λ) as a survival function: scipy's cdf gives nan far in that tail.
    return float(stats.nct.sf(critical, dof, noncentrality) + stats.nct.sf(critical, dof, -noncentrality))


def pairs_needed(
    *, effect_size: float, alpha: float, power: float = DEFAULT_POWER, max_pairs: int = MAX_PAIRS
) -> int | None:
    """The fewest pairs (≥ 2) whose paired t test reaches ``power``; None if more than ``max_pairs``.

    Power grows with n, so a doubling search brackets it and a bisection finds it.
    """
    if effect_size == 0:
        raise ValueError("effect_size must be non-zero: no number of pairs detects a zero difference")

    def enough(n: int) -> bool:
        return paired_t_power(pairs=n, effect_size=effect_size, alpha=alpha) >= power

    low, high = 1, 2  # not enough at low (a t test needs 2 pairs), enough at high once bracketed
    while not enough(high):
        if high >= max_pairs:
            return None
        low, high = high, min(2 * high, max_pairs)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


@dataclass(frozen=True)
class SeedPlan:
    """How many pairs a comparison has and would need; ``needed`` is None where ``why_none`` says why."""

    pairs: int
    delta: float  # mean paired difference, in metric points
    needed: int | None
    why_none: str | None = None

    @property
    def to_add(self) -> int:
        return max(0, (self.needed or 0) - self.pairs)


def plan_seeds(differences: Sequence[float], *, alpha: float, power: float = DEFAULT_POWER) -> SeedPlan:
    """The plan of one paired comparison from its per-seed differences (at least 2)."""
    d = np.asarray(differences, dtype=float)
    delta = float(d.mean())
    if np.ptp(d) == 0:
        why = "no difference between the methods on any seed" if delta == 0 else "no variance"
        return SeedPlan(d.size, delta, None, why)
    needed = pairs_needed(effect_size=delta / float(d.std(ddof=1)), alpha=alpha, power=power)
    return SeedPlan(d.size, delta, needed, None if needed else f"more than {MAX_PAIRS}")


def describe_plan(plan: SeedPlan, *, metric: str, alpha: float, power: float) -> str:
    """The plan in words: "about 7 pairs would detect +0.70 mAP at α = 0.05 with 80% power; you have 3"."""
    have = f"you have {plan.pairs}"
    if plan.why_none == "no variance":
        return (
            f"every pair differs by the same {plan.delta:+.2f} {metric}: no spread to size a study from "
            f"({have}); more seeds would show whether the spread really is that small"
        )
    if plan.why_none is not None and plan.needed is None and plan.delta == 0:
        return f"the mean difference is exactly 0 {metric}: no number of pairs would detect it ({have})"
    target = f"detect {plan.delta:+.2f} {metric} at α = {alpha:g} with {power:.0%} power"
    if plan.needed is None:
        return f"more than {MAX_PAIRS} pairs would be needed to {target}; {have}"
    return f"about {plan.needed} pairs would {target}; {have}"
