"""Two-level paired bootstrap of Δ mAP from every query's result: seeds and test identities resampled.

A method's test mAP varies with the seed (training) and with the test set (which identities happen to
be in it); the t test over seeds sees only the first. Every run of a dataset is tested on the same
queries, so with each run's per-query AP (``reidreg.per_query``) both sources can be
resampled. The design is *crossed* — every seed is scored on every identity — so a replicate draws
(Owen, "The pigeonhole bootstrap", Annals of Applied Statistics 2007):

1. a test set: K identities drawn with replacement from the K with a valid query, each bringing all its
   queries (queries of one person are not independent: same appearance, same gallery matches); this one
   resampled test set scores every run of the dataset, both methods and every seed alike;
2. for each comparison, n seeds drawn with replacement from its n paired seeds, the same draw for the
   method and the baseline (the seed's shared effect stays paired).

The replicate's Δ is the mean over the drawn seeds of (mAP of the method − mAP of the baseline) on the
resampled test set; the 95 % interval is the 2.5th–97.5th percentile of Δ over the replicates. The
probability of improvement P(A > B) is the share of paired seeds where the method's mAP beats the
baseline's (ties count ½), with its interval from the same replicates, as in Bouthillier et al.,
"Accounting for Variance in Machine Learning Benchmarks", MLSys 2021 (and rliable: Agarwal et al.,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021).

Assumptions: seeds are exchangeable draws of the training randomness, identities exchangeable draws of
the population of people; the percentile interval is only approximate with few seeds (with 3 seeds a
replicate holds at most 3 distinct values).

Vectorised: per run, AP sums and query counts per identity; a block of replicates is a matrix of
identity counts (one ``bincount`` of an index matrix), and every run's resampled mAP is one matrix
product. Each dataset and each comparison get their own random stream derived from ``seed`` and their
names, so a result does not change when other methods or datasets are added to the study.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reidreg.per_query import PerQuery

DEFAULT_SAMPLES = 10_000
BLOCK = 500  # replicates per block: bounds the memory of the identity-count matrix
CONFIDENCE = 0.95


@dataclass(frozen=True)
class BootstrapResult:
    """Δ mAP (points) interval and the probability of improvement with its interval."""

    low: float
    high: float
    p_improvement: float
    p_improvement_low: float
    p_improvement_high: float
    samples: int


def _stream(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


class DatasetBootstrap:
    """Resampled mAPs of the runs of one dataset, all on the same resampled test sets.

    ``per_query``: every run's results, in the order of their columns. Raises ValueError if they are not
    results on the same queries (pids and validity must match).
    """

    def __init__(
        self,
        per_query: Sequence[PerQuery],
        *,
        dataset: str,
        seed: int = 0,
        samples: int = DEFAULT_SAMPLES,
    ) -> None:
        if not per_query:
            raise ValueError("no per-query results to resample")
        first = per_query[0]
        for other in per_query[1:]:
            if not (np.array_equal(other.pid, first.pid) and np.array_equal(other.valid, first.valid)):
                raise ValueError(
                    "the runs were not tested on the same queries (pids or valid queries differ)"
                )
        identities, identity_of = np.unique(first.pid[first.valid], return_inverse=True)
        num_identities = identities.size
        counts = np.bincount(identity_of, minlength=num_identities).astype(float)
        sums = np.stack(
            [
                np.bincount(identity_of, weights=run.ap[first.valid], minlength=num_identities)
                for run in per_query
            ],
            axis=1,
        )  # (identities, runs)
        self.seed, self.dataset, self.samples = seed, dataset, samples
        self.observed = sums.sum(0) / counts.sum()  # every run's mAP
        self.resampled = np.empty((samples, len(per_query)))  # every replicate's mAP of every run
        rng = _stream(seed, "test set", dataset)
        for start in range(0, samples, BLOCK):
            rows = min(BLOCK, samples - start)
            drawn = rng.integers(0, num_identities, (rows, num_identities))
            drawn += num_identities * np.arange(rows)[:, None]
            weights = np.bincount(drawn.ravel(), minlength=rows * num_identities).reshape(rows, -1)
            self.resampled[start : start + rows] = (weights @ sums) / (weights @ counts)[:, None]

    def compare(
        self, method_columns: Sequence[int], baseline_columns: Sequence[int], *, name: str
    ) -> BootstrapResult:
        """A method against the baseline over paired seeds: column i of each is the same seed."""
        method, baseline = np.asarray(method_columns), np.asarray(baseline_columns)
        if method.size != baseline.size or method.size < 2:
            raise ValueError(f"need at least 2 paired seeds, got {method.size} and {baseline.size} runs")
        rng = _stream(self.seed, "seeds", self.dataset, name)
        seeds = rng.integers(0, method.size, (self.samples, method.size))
        rows = np.arange(self.samples)[:, None]
        a, b = self.resampled[rows, method[seeds]], self.resampled[rows, baseline[seeds]]
        delta = 100 * (a - b).mean(1)
        beats = ((a > b) + 0.5 * (a == b)).mean(1)
        observed = self.observed[method] - self.observed[baseline]
        tails = 100 * np.array([(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
        low, high = np.percentile(delta, tails)
        p_low, p_high = np.percentile(beats, tails)
        return BootstrapResult(
            low=float(low),
            high=float(high),
            p_improvement=float(((observed > 0) + 0.5 * (observed == 0)).mean()),
            p_improvement_low=float(p_low),
            p_improvement_high=float(p_high),
            samples=self.samples,
        )
