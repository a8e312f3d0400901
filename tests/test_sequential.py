"""The Pocock sequential rule keeps the false-positive rate at α when a study is extended seed by seed."""

import numpy as np
import pytest

from reidreg.reporting.sequential import (
    CONTINUE,
    DECIDED,
    FUTILE,
    SequentialDesign,
    decide,
    describe_decision,
    look_p_values,
)

NULL_STUDIES = 20_000


@pytest.mark.parametrize(("alpha", "min_pairs", "max_pairs"), [(0.05, 3, 10), (0.05, 2, 6), (0.01, 3, 12)])
def test_false_positive_rate_stays_at_alpha_while_naive_looks_inflate_it(alpha, min_pairs, max_pairs):
    design = SequentialDesign(alpha, min_pairs=min_pairs, max_pairs=max_pairs)
    # Null studies independent of the calibration (another generator seed), with an arbitrary spread.
    null = 1.7 * np.random.default_rng(12345).standard_normal((NULL_STUDIES, max_pairs))
    p = look_p_values(null, min_pairs=min_pairs)  # every look of every study
    pocock = (p < design.nominal_alpha).any(axis=1).mean()
    naive = (p < alpha).any(axis=1).mean()
    assert abs(pocock - alpha) < 0.01, pocock
    assert naive > alpha + 0.02, naive  # looking at every step at α would have failed this test


def test_look_p_values_are_the_paired_t_test_at_each_look():
    from scipy import stats

    d = np.random.default_rng(3).standard_normal((4, 7))
    p = look_p_values(d, min_pairs=3)
    for study in range(4):
        for n in range(3, 8):
            expected = stats.ttest_1samp(d[study, :n], 0).pvalue
            assert p[study, n - 3] == pytest.approx(expected, rel=1e-9)


def test_decisions_stop_continue_and_futility():
    design = SequentialDesign(0.05, min_pairs=3, max_pairs=5)
    decided = decide(design, [1.0, 1.2, 0.9, -3.0])
    assert (decided.outcome, decided.look) == (DECIDED, 3)  # crossed at 3: a later pair does not undo it
    assert decide(design, [1.0, -1.0]).outcome == CONTINUE  # before the first look
    assert decide(design, [1.0, -1.0, 0.5, 0.2]).outcome == CONTINUE
    futile = decide(design, [1.0, -1.0, 0.5, 0.2, -0.3, 2.0])
    assert futile.outcome == FUTILE
    assert "futility" in describe_decision(futile, design, have=6) and "beyond 5" in describe_decision(
        futile, design, have=6
    )
    with pytest.raises(ValueError, match="--min-seeds must be at least 2"):
        SequentialDesign(0.05, min_pairs=1, max_pairs=5)
