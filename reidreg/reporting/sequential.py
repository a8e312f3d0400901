"""A Pocock group-sequential rule for a paired comparison extended seed by seed (Pocock, "Group sequential
methods in the design and analysis of clinical trials", Biometrika 64(2), 1977).

Looking at the paired t test after every new pair and stopping at the first p < α inflates the false
positive rate far above α (looks at 3..10 pairs, α = 0.05: about 0.16-0.17 in simulations of normal
differences). Pocock's design keeps it at α by testing every look at the same, smaller *nominal*
level α′, chosen so that under "no difference" the chance that any look n = n_min..n_max reaches
p_n < α′ is α.

Pocock computes α′ for a z statistic with known variance. With a few seeds the variance is estimated and
the looks use t statistics with n − 1 degrees of freedom, so α′ is calibrated here by simulation: the
paired t statistic is scale-free, so under normal paired differences with mean 0 its joint law over the
looks does not depend on the unknown variance, and ``CALIBRATION_STUDIES`` null studies of standard normal
differences (a fixed generator seed, hence one α′ per design) give α′ as the α-quantile of their smallest p.

The rule on a study with n pairs, in the order of their seeds: *decided* at the first look with p < α′;
else *futile* once n_max pairs are reached; else *continue* (add a seed to both methods). Skipping looks
only makes the rule more conservative. Each comparison is one design at α (no Holm correction across
methods: for a family-wise α over m methods give α / m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

CALIBRATION_STUDIES = 200_000
CALIBRATION_SEED = 0
DEFAULT_MIN_PAIRS, DEFAULT_MAX_PAIRS = 3, 10
MAX_LOOKS = 50  # the calibration holds CALIBRATION_STUDIES × max_pairs values in memory
DECIDED, CONTINUE, FUTILE = "decided", "continue", "futile"


def look_p_values(differences: np.ndarray, *, min_pairs: int) -> np.ndarray:
    """Two-sided paired t p-values at every look n = min_pairs..N of each study (row) of ``differences``.

    ``differences``: (studies, N); returns (studies, N − min_pairs + 1).
    """
    n = np.arange(1, differences.shape[1] + 1)
    mean = np.cumsum(differences, axis=1) / n
    # Σ d² − n·mean² is the running sum of squares about the mean; clipped at 0 against rounding.
    squares = np.clip(np.cumsum(differences**2, axis=1) - n * mean**2, 0, None)
    looks = slice(min_pairs - 1, None)
    dof = n[looks] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean[:, looks] / np.sqrt(squares[:, looks] / dof / n[looks])
    return np.where(np.isnan(t), 1.0, 2 * stats.t.sf(np.abs(t), dof))


@lru_cache(maxsize=32)
def nominal_alpha(*, alpha: float, min_pairs: int, max_pairs: int) -> float:
    """Pocock's constant nominal level α′ for the looks min_pairs..max_pairs, calibrated by simulation."""
    generator = np.random.default_rng(CALIBRATION_SEED)
    null = generator.standard_normal((CALIBRATION_STUDIES, max_pairs))
    smallest = look_p_values(null, min_pairs=min_pairs).min(axis=1)
    return float(np.quantile(smallest, alpha))


@dataclass(frozen=True)
class SequentialDesign:
    alpha: float
    min_pairs: int = DEFAULT_MIN_PAIRS
    max_pairs: int = DEFAULT_MAX_PAIRS

    def __post_init__(self) -> None:
        if not 2 <= self.min_pairs <= self.max_pairs <= MAX_LOOKS:
            raise ValueError(
                f"--min-seeds must be at least 2 and at most --max-seeds, itself at most {MAX_LOOKS} "
                f"(got {self.min_pairs} and {self.max_pairs})"
            )

    @property
    def nominal_alpha(self) -> float:
        return nominal_alpha(alpha=self.alpha, min_pairs=self.min_pairs, max_pairs=self.max_pairs)


@dataclass(frozen=True)
class SequentialDecision:
    outcome: str  # DECIDED, CONTINUE or FUTILE
    pairs: int  # pairs looked at (at most max_pairs)
    look: int | None  # the look (pairs) at which the boundary was crossed


def decide(design: SequentialDesign, differences: Sequence[float]) -> SequentialDecision:
    """Apply the rule to one comparison's paired differences, in the order the seeds were added."""
    d = np.asarray(differences, dtype=float)[: design.max_pairs]
    if d.size >= design.min_pairs:
        crossed = np.flatnonzero(
            look_p_values(d[None, :], min_pairs=design.min_pairs)[0] < design.nominal_alpha
        )
        if crossed.size:
            return SequentialDecision(DECIDED, d.size, design.min_pairs + int(crossed[0]))
    return SequentialDecision(FUTILE if d.size >= design.max_pairs else CONTINUE, d.size, None)


def describe_decision(decision: SequentialDecision, design: SequentialDesign, *, have: int) -> str:
    """The decision in words, with the design it comes from."""
    rule = (
        f"Pocock rule, looks at {design.min_pairs}..{design.max_pairs} pairs, each at nominal "
        f"p < {design.nominal_alpha:.3g} for α = {design.alpha:g}"
    )
    beyond = (
        f" (pairs beyond {design.max_pairs} not looked at; you have {have})"
        if have > design.max_pairs
        else ""
    )
    if decision.outcome == DECIDED:
        return f"sequential: stop, decided at {decision.look} pairs ({rule}){beyond}"
    if decision.outcome == FUTILE:
        return (
            f"sequential: stop for futility, {design.max_pairs} pairs reached without a decision "
            f"({rule}){beyond}"
        )
    return (
        f"sequential: continue, add a seed to both methods ({decision.pairs} of at most "
        f"{design.max_pairs} pairs; {rule})"
    )
