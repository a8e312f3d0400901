"""Statistics of a comparison over seeds: mean ± std, Welch's t-test, Holm's correction.

Each method is run with a few seeds; a seed's score is one sample of the method's score distribution.

- Summary: the mean and the *sample* standard deviation (ddof = 1) of the n seeds.
- Test against the baseline: Welch's two-sided t-test (unequal variances), our choice. It needs no
  pairing of seeds: a seed fixes the initialisation and the data order, but a regularizer changes the
  path from there on (and GPU training is not bit-exact), so seed-matched runs are not paired samples:

      t = (m_a − m_b) / sqrt(s_a²/n_a + s_b²/n_b)
      ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))   (Welch–Satterthwaite)
      p = 2 · P(T_ν > |t|)

  With fewer than 2 seeds on either side (or no variance on both sides) there is no test: "n/a".
- Several methods are compared with the same baseline, so the chance that one of them looks
  significant by luck grows with their number. Holm's step-down correction keeps that family-wise
  error at α: with the m p-values sorted, p₍ᵢ₎ is multiplied by (m − i + 1), made monotone, capped at 1.

With 3 seeds the test can only detect large effects; "not significant" means "not shown", not "equal".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std (ddof = 1); nan with a single value
    n: int


def summarize(values: Sequence[float]) -> Summary:
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Summary(mean=float(values.mean()), std=std, n=len(values))


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test for equal means; None when the test is undefined."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # t = ±inf or 0/0: the t distribution says nothing
        return None
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input order; None entries are left out of the family."""
    present = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running_max = 0.0
    for rank, (p, index) in enumerate(present):
        running_max = max(running_max, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running_max
    return adjusted
