"""The two-level paired bootstrap: equal to a direct query-level computation with the same draws,
reproducible for a seed, and wired into ``python -m reidreg.report`` from the runs' per-query files."""

from __future__ import annotations

import csv
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks.report_speed import write_study
from reidreg.per_query import PerQuery
from reidreg.report import main
from reidreg.reporting.bootstrap import BLOCK, DatasetBootstrap
from reidreg.run_dir import PER_QUERY_FILE

REPO = Path(__file__).resolve().parents[1]


def fake_runs(
    seeds: int = 5, *, effect: float = 0.01, num_ids: int = 40
) -> tuple[list[PerQuery], list[PerQuery]]:
    """Baseline and method per seed on one test set: identity difficulty, a shared seed shift, noise."""
    rng = np.random.default_rng(7)
    pid = np.repeat(np.arange(num_ids), rng.integers(1, 6, num_ids))
    valid = rng.random(pid.size) > 0.05
    difficulty = rng.normal(0, 0.2, num_ids)[pid]

    def run(shift: float) -> PerQuery:
        ap = np.clip(0.5 + difficulty + shift + rng.normal(0, 0.05, pid.size), 0, 1)
        return PerQuery(
            query_index=np.arange(pid.size),
            pid=pid,
            camid=np.zeros(pid.size, int),
            valid=valid,
            ap=np.where(valid, ap, np.nan),
            inp=np.where(valid, ap, np.nan),
            first_match_rank=valid.astype(int),
        )

    shifts = rng.normal(0, 0.02, seeds)
    return [run(s) for s in shifts], [run(s + effect) for s in shifts]


def direct_bootstrap(
    runs: list[PerQuery],
    method: list[int],
    baseline: list[int],
    *,
    samples: int,
    seed: int,
    dataset: str,
    name: str,
) -> np.ndarray:
    """Each replicate built query by query: the drawn identities' queries concatenated, their mean AP."""
    valid = runs[0].valid
    identities = np.unique(runs[0].pid[valid])
    rng = np.random.default_rng([seed, zlib.crc32(b"test set"), zlib.crc32(dataset.encode())])
    drawn = np.concatenate(
        [
            rng.integers(0, identities.size, (min(BLOCK, samples - start), identities.size))
            for start in range(0, samples, BLOCK)
        ]
    )
    seed_rng = np.random.default_rng(
        [seed, zlib.crc32(b"seeds"), zlib.crc32(dataset.encode()), zlib.crc32(name.encode())]
    )
    seed_draws = seed_rng.integers(0, len(method), (samples, len(method)))
    deltas = []
    for replicate in range(samples):
        queries = np.concatenate(
            [np.flatnonzero(valid & (runs[0].pid == identities[k])) for k in drawn[replicate]]
        )
        maps = [run.ap[queries].mean() for run in runs]
        deltas.append(np.mean([maps[method[j]] - maps[baseline[j]] for j in seed_draws[replicate]]))
    return 100 * np.array(deltas)


def test_the_vectorised_bootstrap_equals_a_query_level_loop_with_the_same_draws():
    baseline, method = fake_runs(seeds=4)
    runs = baseline + method
    columns_a, columns_b = [4, 5, 6, 7], [0, 1, 2, 3]
    resampler = DatasetBootstrap(runs, dataset="market1501", seed=3, samples=600)  # two blocks
    result = resampler.compare(columns_a, columns_b, name="sgsl")
    deltas = direct_bootstrap(
        runs, columns_a, columns_b, samples=600, seed=3, dataset="market1501", name="sgsl"
    )
    assert (result.low, result.high) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-9)
    np.testing.assert_allclose(resampler.observed, [run.mean_ap() for run in runs], rtol=1e-12)


def test_reproducible_for_a_seed_different_with_another_and_covering_the_paired_estimate():
    baseline, method = fake_runs(seeds=6, effect=0.01)
    runs = baseline + method
    columns_a, columns_b = list(range(6, 12)), list(range(6))

    def compare(seed: int):
        return DatasetBootstrap(runs, dataset="d", seed=seed, samples=2000).compare(
            columns_a, columns_b, name="m"
        )

    first, again, other = compare(0), compare(0), compare(1)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    paired = 100 * np.mean([m.mean_ap() - b.mean_ap() for m, b in zip(method, baseline, strict=True)])
    assert first.low < paired < first.high
    wins = [m.mean_ap() > b.mean_ap() for m, b in zip(method, baseline, strict=True)]
    assert first.p_improvement == pytest.approx(np.mean(wins)) and 0 < first.p_improvement < 1
    assert first.p_improvement_low <= first.p_improvement <= first.p_improvement_high
    # Adding a method to the study leaves this comparison unchanged (its own random streams).
    more = DatasetBootstrap(runs + baseline[:1], dataset="d", seed=0, samples=2000).compare(
        columns_a, columns_b, name="m"
    )
    assert vars(more) == pytest.approx(vars(first), rel=1e-12)  # up to the matrix product's rounding


def test_identity_resampling_widens_the_interval_beyond_seed_noise():
    """With no seed noise at all, the interval still reflects which identities are in the test set."""
    baseline, _ = fake_runs(seeds=3)
    rng = np.random.default_rng(0)
    # The method helps hard identities a lot and easy ones not at all: its gain depends on the test set.
    method = []
    for run in baseline:
        gain = np.where(run.ap < 0.5, 0.2, 0.0) * rng.random()
        method.append(PerQuery(**{**vars(run), "ap": run.ap + gain}))
    result = DatasetBootstrap(baseline + method, dataset="d", samples=2000).compare(
        [3, 4, 5], [0, 1, 2], name="m"
    )
    assert result.high - result.low > 0.5  # points


def test_runs_on_different_queries_are_refused():
    baseline, method = fake_runs(seeds=2)
    other = PerQuery(**{**vars(method[0]), "pid": method[0].pid + 1})
    with pytest.raises(ValueError, match="not tested on the same queries"):
        DatasetBootstrap([baseline[0], other], dataset="d")


def _report_csv(study: Path, out: Path, *options: str, typed: bool = False) -> dict[str, dict[str, str]]:
    """``python -m reidreg.report`` as typed (``typed``: in a new process) or its ``main`` in this one."""
    arguments = [str(study), "--out", str(out), "--no-plots", *options]
    if typed:
        result = subprocess.run(
            [sys.executable, "-m", "reidreg.report", *arguments],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    else:
        assert main(arguments) == 0
    with (out / "report.csv").open() as file:
        return {row["method"]: row for row in csv.DictReader(file)}


def test_the_report_cli_bootstraps_from_per_query_files_deterministically_for_its_seed(tmp_path):
    study = tmp_path / "study"
    write_study(
        study,
        methods={"none": 0.0, "sgsl": 0.01, "sgp": 0.0},
        seeds=[0, 1, 2, 3],
        num_queries=600,
        num_ids=150,
    )
    first = _report_csv(study, tmp_path / "a", "--seed", "5", "--bootstrap-samples", "1000", typed=True)
    again = _report_csv(study, tmp_path / "b", "--seed", "5", "--bootstrap-samples", "1000")
    other = _report_csv(study, tmp_path / "c", "--seed", "6", "--bootstrap-samples", "1000")
    sgsl = first["sgsl"]
    assert sgsl == again["sgsl"]
    assert (sgsl["mAP_bootstrap_low"], sgsl["mAP_bootstrap_high"]) != (
        other["sgsl"]["mAP_bootstrap_low"],
        other["sgsl"]["mAP_bootstrap_high"],
    )
    assert float(sgsl["mAP_bootstrap_low"]) < float(sgsl["mAP_delta"]) < float(sgsl["mAP_bootstrap_high"])
    # The paired statistics in the same report, against scipy on the runs' own test_metrics values.
    base = [float(v) for v in first["none"]["mAP_values"].split(";")]
    mine = [float(v) for v in sgsl["mAP_values"].split(";")]
    assert float(sgsl["mAP_p"]) == pytest.approx(scipy_stats.ttest_rel(mine, base).pvalue, rel=1e-3)
    assert sgsl["mAP_pairs"] == "4" and sgsl["mAP_test"] == "paired t"
    assert float(sgsl["mAP_p_improvement"]) == 1.0
    assert all(float(row["mAP_p_improvement"]) <= 1 for row in first.values() if row["mAP_p_improvement"])
    assert (study / "0" / PER_QUERY_FILE).is_file()
