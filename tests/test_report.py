"""``reidreg.report`` on hand-made run directories: statistics against their formulas, method names,
missing and failed runs, the written table and plots. (A real study goes through it in test_sweeps.py.)"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from reidreg.errors import ConfigError
from reidreg.report import main, report
from reidreg.reporting.gather import Run, expected_jobs, gather
from reidreg.reporting.methods import comparability_notes, method_labels
from reidreg.reporting.plots import lambda_history, over_seeds
from reidreg.reporting.stats import (
    PAIRED,
    WELCH,
    holm_adjust,
    paired_difference,
    sign_flip_min_pairs,
    sign_flip_p_value,
    summarize,
    welch_difference,
)
from reidreg.reporting.table import Cost, build_rows
from reidreg.reporting.table_text import markdown_table

REGULARIZER_NODES = {
    "none": {},
    "constant_l2": {"constant_l2": {"_target_": "reidreg.regularizers.constant_l2.ConstantL2", "lam": 0.005}},
    "sgsl": {"sgsl": {"_target_": "reidreg.regularizers.sgsl.SGSL", "gamma": 30.0}},
    "adaptive_l2": {
        "adaptive_l2": {"_target_": "reidreg.regularizers.adaptive_l2.AdaptiveL2", "amplitude": 0.005}
    },
}


def make_run(
    run_dir: Path,
    *,
    regularizer: str = "none",
    seed: int = 0,
    dataset: str = "synthetic",
    mAP: float | None = 0.5,  # noqa: N803  (the metric's name)
    job_num: int | None = None,
    overrides: list[str] | None = None,
    experiment: str | None = None,
    config: dict[str, Any] | None = None,
    lambda_rows: list[dict[str, float]] | None = None,
) -> Path:
    """A run directory as reidreg.train (and Hydra, with ``job_num``) leaves it; no metrics if mAP is None."""
    run_dir.mkdir(parents=True)
    resolved = {
        "seed": seed,
        "test": True,
        "dataset": {"name": dataset, "options": {}},
        "data": {"seed": seed, "root": "./data", "num_identities": 16},
        "trainer": {"max_epochs": 2, "default_root_dir": str(run_dir)},
        "paths": {"output_dir": str(run_dir)},
        "regularizer": json.loads(json.dumps(REGULARIZER_NODES[regularizer])),
    }
    for key, value in (config or {}).items():  # dotted keys
        node = resolved
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved))
    if mAP is not None:
        metrics = {
            "test/mAP": mAP,
            "test/R1": mAP + 0.2,
            "test/R5": 0.9,
            "test/R10": 0.95,
            "test/mINP": mAP / 2,
        }
        (run_dir / "test_metrics.json").write_text(json.dumps(metrics))
    if job_num is not None:
        hydra = {
            "mode": "MULTIRUN",
            "job": {"name": "train", "num": job_num},
            "runtime": {"choices": {"experiment": experiment, "regularizer": regularizer}},
        }
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
        (run_dir / "train.log").write_text("[2024-01-01][__main__][INFO] - started\n")
    if lambda_rows is not None:
        (run_dir / "csv").mkdir()
        columns = sorted({key for row in lambda_rows for key in row})
        with (run_dir / "csv" / "metrics.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["epoch", *columns])
            writer.writeheader()
            writer.writerows({"epoch": 0, **row} for row in lambda_rows)
    return run_dir


def make_multirun(sweep_dir: Path, params: dict[str, str], task: list[str]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    hydra = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
        "overrides": {"task": task, "hydra": ["hydra.mode=MULTIRUN"]},
    }
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "seed": 0}))


# ----------------------------------------------------------------------------------------- statistics
def test_summary_is_mean_and_sample_std():
    summary = summarize([1.0, 2.0, 6.0])
    assert summary.mean == pytest.approx(3.0)
    assert summary.std == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert summary.n == 3
    assert math.isnan(summarize([4.0]).std)


def test_welch_difference_matches_the_welch_satterthwaite_formula():
    a, b = [70.1, 71.3, 70.8], [68.2, 69.9, 68.7, 69.0]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    difference = welch_difference(a, b)
    assert difference.test == WELCH and difference.pairs == 0 and difference.p_sign_flip is None
    assert difference.p == pytest.approx(2 * scipy_stats.t.sf(abs(t), dof), rel=1e-10)
    assert difference.p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    half = scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert difference.delta == pytest.approx(np.mean(a) - np.mean(b))
    assert (difference.low, difference.high) == pytest.approx(
        (difference.delta - half, difference.delta + half)
    )
    assert 0.0 < difference.p < 0.05  # a clear difference on this example


def test_welch_is_undefined_without_two_seeds_or_without_variance():
    assert welch_difference([70.0], [69.0, 68.0]).why_no_test == "<2 seeds on a side"
    no_variance = welch_difference([70.0, 70.0], [69.0, 69.0])
    assert no_variance.p is None and no_variance.low is None and no_variance.why_no_test == "no variance"


def brute_force_sign_flip(differences) -> float:
    """Every one of the 2^n sign patterns, written out."""
    observed = abs(sum(differences))
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    reached = sum(
        abs(sum(s * d for s, d in zip(signs, differences, strict=True))) >= observed - 1e-9
        for signs in patterns
    )
    return reached / len(patterns)


def test_paired_difference_matches_scipy_and_a_brute_force_sign_flip_test():
    a = [71.2, 69.8, 72.5, 70.9, 71.7, 70.2, 72.0]
    b = [70.1, 69.9, 71.0, 70.0, 70.2, 69.1, 71.3]
    d = np.subtract(a, b)
    difference = paired_difference(a, b)
    assert difference.test == PAIRED and difference.pairs == 7
    assert difference.delta == pytest.approx(d.mean())
    half = scipy_stats.t.ppf(0.975, 6) * d.std(ddof=1) / math.sqrt(7)
    assert difference.low == pytest.approx(d.mean() - half, rel=1e-12)
    assert difference.high == pytest.approx(d.mean() + half, rel=1e-12)
    assert difference.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert difference.p_sign_flip == brute_force_sign_flip(list(d)) == pytest.approx(4 / 128)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9, 13])
def test_exact_sign_flip_test_equals_the_enumeration_of_every_sign_pattern(n):
    rng = np.random.default_rng(n)
    for differences in (
        rng.normal(0.3, 1.0, n),
        rng.integers(-2, 3, n).astype(float),  # ties and zeros
        np.full(n, 0.5),
    ):
        assert sign_flip_p_value(differences) == pytest.approx(brute_force_sign_flip(list(differences)))


def test_sign_flip_test_runs_only_where_p_below_alpha_is_reachable():
    assert sign_flip_min_pairs(0.05) == 6 and sign_flip_min_pairs(0.01) == 8
    # Five pairs all in the same direction: the smallest two-sided p there is, 2 / 2^5, above 0.05.
    assert sign_flip_p_value([1.0] * 5) == pytest.approx(0.0625)
    five = paired_difference([1.0, 2.0, 3.0, 4.0, 5.5], [0.0] * 5)
    assert five.p_sign_flip is None and five.why_no_sign_flip == "n<6"
    assert paired_difference([1.0] * 6, [0.0, 0.5, 0.1, 0.2, 0.3, 0.4]).p_sign_flip == pytest.approx(2 / 64)
    one = paired_difference([1.0], [0.5])
    assert one.p is None and one.why_no_test == "1 pair" and one.delta == pytest.approx(0.5)
    same = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every seed moved by 0.5
    assert same.p is None and same.why_no_test == "no variance" and same.delta == pytest.approx(0.5)


def test_holm_adjustment_by_hand():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm_adjust([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])
    assert holm_adjust([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # 0.6 * 2 capped at 1; 0.9 raised to it
    assert holm_adjust([0.3, 0.01]) == pytest.approx([0.3, 0.02])
    assert holm_adjust([None]) == [None]


# ------------------------------------------------------------------------------ gathering, missing jobs
def test_expected_jobs_are_rebuilt_as_hydra_numbers_them():
    sweep = {
        "sweeper": {
            "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
            "params": {"regularizer": "none,sgsl", "seed": "0,1", "dataset": "market1501"},
        },
        # the command line wins over the sweep params for the same key, and adds its own
        "overrides": {"task": ["dataset=synthetic", "trainer.max_epochs=1"]},
    }
    jobs = expected_jobs(sweep)
    assert [sorted(job) for job in jobs] == [
        sorted(["regularizer=none", "seed=0", "dataset=synthetic", "trainer.max_epochs=1"]),
        sorted(["regularizer=none", "seed=1", "dataset=synthetic", "trainer.max_epochs=1"]),
        sorted(["regularizer=sgsl", "seed=0", "dataset=synthetic", "trainer.max_epochs=1"]),
        sorted(["regularizer=sgsl", "seed=1", "dataset=synthetic", "trainer.max_epochs=1"]),
    ]
    assert expected_jobs({"sweeper": {"_target_": "x.OptunaSweeper", "n_trials": 3}}) == [[], [], []]
    assert expected_jobs({"sweeper": {"_target_": "x.Other"}}) is None


def _study_with_a_failed_and_a_missing_job(root: Path) -> Path:
    sweep = root / "sweep"
    make_multirun(sweep, {"regularizer": "none,sgsl", "seed": "0,1"}, ["dataset=synthetic"])
    jobs = [("none", 0, 0.50), ("none", 1, 0.52), ("sgsl", 0, None)]  # job 2 failed, job 3 never started
    for num, (regularizer, seed, value) in enumerate(jobs):
        overrides = [f"regularizer={regularizer}", f"seed={seed}", "dataset=synthetic"]
        make_run(
            sweep / str(num), regularizer=regularizer, seed=seed, mAP=value, job_num=num, overrides=overrides
        )
    return sweep


def test_gather_lists_finished_unfinished_and_missing_jobs(tmp_path):
    sweep = _study_with_a_failed_and_a_missing_job(tmp_path)
    study = gather([sweep])
    assert [run.run_dir.name for run in study.finished] == ["0", "1"]
    assert [run.run_dir.name for run in study.unfinished] == ["2"]
    assert [(job.job_num, sorted(job.overrides)) for job in study.missing] == [
        (3, ["dataset=synthetic", "regularizer=sgsl", "seed=1"])
    ]
    # A run directory named alone does not make its siblings expected.
    assert gather([sweep / "0"]).missing == []


def test_report_counts_failed_runs_in_their_row_and_lists_failed_and_missing_runs(tmp_path):
    sweep = _study_with_a_failed_and_a_missing_job(tmp_path)
    text, written = report([sweep], plots=False)
    assert "## Unfinished or failed runs (1)" in text
    assert f"`{sweep / '2'}`: sgsl on synthetic, seed 0" in text
    assert "regularizer=sgsl seed=0 dataset=synthetic" in text
    assert f"job log `{sweep / '2' / 'train.log'}`" in text
    assert "## Missing runs (1)" in text and "job 3:" in text
    with (sweep / "report.csv").open() as file:
        rows = list(csv.DictReader(file))
    # The method whose only run failed keeps its row, with nothing averaged.
    assert [(row["method"], row["n"], row["finished"], row["launched"]) for row in rows] == [
        ("none", "2", "2", "2"),
        ("sgsl", "0", "0", "1"),
    ]
    assert "| sgsl | synthetic | 0/1: 1 no test metrics | — (no finished run) |" in text
    assert written == [sweep / "report.md", sweep / "report.csv"]
    assert (sweep / "report.md").read_text() == text


def test_runs_of_several_directories_and_no_runs(tmp_path, capsys):
    make_run(tmp_path / "a" / "run", regularizer="none", mAP=0.5)
    make_run(tmp_path / "b" / "run", regularizer="sgsl", mAP=0.6)
    assert main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--no-plots"]) == 0
    assert (tmp_path / "report.md").is_file()  # the common parent
    assert (
        "| sgsl | synthetic | 1/1 | 60.00 | +10.00 | none: unpaired (Welch) | n/a (<2 seeds on a side) |"
        in capsys.readouterr().out
    )
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


# -------------------------------------------------------------------------------------- method names
def _gathered(tmp_path: Path, specs: list[dict[str, Any]]):
    for index, spec in enumerate(specs):
        make_run(tmp_path / f"run{index}", job_num=index, **spec)
    return gather([tmp_path]).finished


def test_seed_and_seed_derived_settings_do_not_split_a_method(tmp_path):
    runs = _gathered(
        tmp_path,
        [
            {"regularizer": r, "seed": s, "config": {"regularizer_seed": s}}
            for r in ("none", "sgsl")
            for s in (0, 1)
        ],
    )
    assert [method_labels(runs)[id(run)] for run in runs] == ["none", "none", "sgsl", "sgsl"]


def test_a_setting_that_differs_within_a_method_is_part_of_its_name(tmp_path):
    runs = _gathered(
        tmp_path,
        [
            {"regularizer": "constant_l2", "seed": 0, "config": {"regularizer.constant_l2.lam": 0.001}},
            {"regularizer": "constant_l2", "seed": 1, "config": {"regularizer.constant_l2.lam": 0.001}},
            {"regularizer": "constant_l2", "seed": 0, "config": {"regularizer.constant_l2.lam": 0.01}},
            {"regularizer": "none", "seed": 0},
        ],
    )
    labels = [method_labels(runs)[id(run)] for run in runs]
    assert labels == [
        "constant_l2 constant_l2.lam=0.001",
        "constant_l2 constant_l2.lam=0.001",
        "constant_l2 constant_l2.lam=0.01",
        "none",
    ]


def test_presets_name_the_methods_when_runs_differ_in_them(tmp_path):
    runs = _gathered(
        tmp_path,
        [
            {"regularizer": "none", "experiment": "table3_1_minimal", "config": {"loss.triplet": False}},
            {"regularizer": "none", "experiment": "table3_2_triplet", "config": {"loss.triplet": True}},
            {"regularizer": "constant_l2", "experiment": "table3_6_l2", "config": {"loss.triplet": True}},
        ],
    )
    labels = method_labels(runs)
    assert [labels[id(run)] for run in runs] == [
        "table3_1_minimal/none",
        "table3_2_triplet/none",
        "table3_6_l2/constant_l2",
    ]
    rows, _ = build_rows(runs, labels)
    assert rows[0].method == "table3_1_minimal/none" and rows[0].is_baseline  # the first preset without L2
    assert comparability_notes(runs, labels) == []  # presets differ by design


def test_settings_that_differ_between_methods_are_reported(tmp_path):
    runs = _gathered(
        tmp_path,
        [
            {"regularizer": "none", "config": {"trainer.max_epochs": 120}},
            {"regularizer": "sgsl", "config": {"trainer.max_epochs": 60}},
        ],
    )
    notes = comparability_notes(runs, method_labels(runs))
    assert notes == ["synthetic: methods differ in trainer.max_epochs (none: 120, sgsl: 60)"]


# ---------------------------------------------------------------------------------------------- table
BASE = [0.700, 0.712, 0.695, 0.721, 0.708, 0.716, 0.703]


def test_rows_compare_each_method_with_the_baseline_of_its_dataset(tmp_path):
    gains = [0.012, 0.008, 0.015, 0.010, 0.004, 0.011, 0.009]  # every seed better: sign-flip p = 2 / 2^7
    values = {
        ("none", "market1501"): BASE,
        ("sgsl", "market1501"): [b + g for b, g in zip(BASE, gains, strict=True)],
        ("adaptive_l2", "market1501"): [b + g for b, g in zip(BASE, [0.002, -0.001, 0.004], strict=False)],
        ("sgsl", "dukemtmc"): [0.60, 0.61],
        ("none", "dukemtmc"): [0.58],
    }
    specs = [
        {"regularizer": r, "dataset": d, "seed": s, "mAP": v}
        for (r, d), vs in values.items()
        for s, v in enumerate(vs)
    ]
    runs = _gathered(tmp_path, specs)
    rows, notes = build_rows(runs, method_labels(runs))
    assert [(row.method, row.dataset) for row in rows] == [
        ("none", "market1501"),
        ("sgsl", "market1501"),
        ("adaptive_l2", "market1501"),
        ("none", "dukemtmc"),
        ("sgsl", "dukemtmc"),
    ]
    base = [100 * v for v in BASE]
    p_values = []
    for row in rows[1:3]:
        mine = [100 * v for v in values[(row.method, "market1501")]]
        n = len(mine)
        comparison = row.metrics["mAP"]
        difference = comparison.difference
        d = np.subtract(mine, base[:n])  # paired by seed: the seeds both have
        assert comparison.summary.mean == pytest.approx(np.mean(mine))
        assert comparison.summary.std == pytest.approx(np.std(mine, ddof=1))
        assert difference.test == PAIRED and difference.pairs == n
        assert difference.delta == pytest.approx(d.mean())
        half = scipy_stats.t.ppf(0.975, n - 1) * np.std(d, ddof=1) / math.sqrt(n)
        assert (difference.low, difference.high) == pytest.approx((d.mean() - half, d.mean() + half))
        assert difference.p == pytest.approx(scipy_stats.ttest_rel(mine, base[:n]).pvalue, rel=1e-9)
        p_values.append(difference.p)
    assert rows[1].metrics["mAP"].difference.p_sign_flip == pytest.approx(brute_force_sign_flip(gains))
    assert rows[2].metrics["mAP"].difference.why_no_sign_flip == "n<6"
    # Holm over the two methods compared with `none` on market1501, by hand
    smaller, larger = sorted(p_values)
    holm = {smaller: min(1, 2 * smaller), larger: max(min(1, 2 * smaller), larger)}
    for row in rows[1:3]:
        comparison = row.metrics["mAP"]
        assert comparison.p_holm == pytest.approx(holm[comparison.difference.p])
        assert comparison.significant == (holm[comparison.difference.p] < 0.05)
    # Only one sign-flip p in its family: Holm leaves it as it is.
    assert rows[1].metrics["mAP"].p_sign_flip_holm == rows[1].metrics["mAP"].difference.p_sign_flip
    assert rows[1].metrics["mAP"].significant  # sgsl: +1 point on every seed
    assert not rows[2].metrics["mAP"].significant  # adaptive_l2: +0.17 points
    # Secondary metrics: tested, never corrected nor starred (mINP is stored as mAP / 2 in these runs).
    minp = rows[1].metrics["mINP"]
    assert minp.summary.mean == pytest.approx(np.mean(values[("sgsl", "market1501")]) * 50)
    assert minp.difference.p == pytest.approx(
        scipy_stats.ttest_rel([50 * v for v in values[("sgsl", "market1501")]], [50 * v for v in BASE]).pvalue
    )
    assert minp.p_holm is None and minp.significant is None
    # dukemtmc: one shared seed is no pairing; Welch has one baseline seed: no test.
    duke = rows[4].metrics["mAP"]
    assert duke.difference.test == WELCH and duke.difference.p is None and duke.significant is None
    assert "sgsl vs none on dukemtmc: fewer than 2 shared seeds, so the unpaired Welch test" in " ".join(
        notes
    )

    table = markdown_table(rows)
    sgsl, adaptive = rows[1].metrics["mAP"], rows[2].metrics["mAP"]
    # The star and the p shown are the same (Holm) p; the interval, the baseline and the pairs are shown.
    assert (
        f"| sgsl | market1501 | 7/7 | {sgsl.summary.mean:.2f} ± {sgsl.summary.std:.2f} | +0.99* "
        f"[{sgsl.difference.low:+.2f}, "
        f"{sgsl.difference.high:+.2f}] | none: 7 pairs | {sgsl.p_holm:.3g} | {sgsl.p_sign_flip_holm:.3g} |"
    ) in table
    assert "| adaptive_l2 | market1501 | 3/3 | 70.40 ± 0.62 | +0.17 [-0.46, +0.79] |" in table
    assert f"| none: 3 pairs | {adaptive.p_holm:.3g} | n/a (n<6) |" in table
    assert "| none | dukemtmc | 1/1 | 58.00 | baseline |" in table
    assert (
        "| sgsl | dukemtmc | 2/2 | 60.50 ± 0.71 | +2.50 | none: unpaired (Welch) | n/a (<2 seeds on a side) |"
        in table
    )
    # Secondary table: raw p, no star.
    secondary = table.split("### Secondary metrics")[1].split("### Cost")[0]
    assert "*" not in secondary.replace("(not corrected, never starred)", "")


def test_repeated_and_unmatched_seeds_are_named_and_never_counted_twice(tmp_path):
    base = {0: 0.70, 1: 0.71, 2: 0.72, 3: 0.69, 4: 0.70}
    mine = [(0, 0.73), (0, 0.75), (0, 0.77), (1, 0.72), (2, 0.74), (3, 0.71), (7, 0.90)]  # seed 0 thrice
    specs = [{"regularizer": "none", "seed": s, "mAP": v} for s, v in base.items()]
    specs += [{"regularizer": "sgsl", "seed": s, "mAP": v} for s, v in mine]
    runs = _gathered(tmp_path, specs)
    rows, notes = build_rows(runs, method_labels(runs))
    sgsl = rows[1].metrics["mAP"]
    # One value per seed: seed 0's three runs are averaged into one (75.00).
    assert sgsl.values == pytest.approx({"0": 75.0, "1": 72.0, "2": 74.0, "3": 71.0, "7": 90.0})
    assert sgsl.summary.n == 5 and sgsl.summary.mean == pytest.approx(np.mean([75, 72, 74, 71, 90]))
    # Paired on the seeds both have once: 1, 2, 3 (seed 0 repeated, 7 and 4 without a partner).
    assert sgsl.difference.pairs == 3
    assert sgsl.difference.p == pytest.approx(scipy_stats.ttest_rel([72, 74, 71], [71, 72, 69]).pvalue)
    assert notes[:2] == [
        "sgsl on synthetic: seed(s) 0 run more than once: each averaged into one value (counted once) and "
        "left out of the pairing",
        "sgsl vs none on synthetic: seed(s) 7 (sgsl only), 0 (none only), 4 (none only) have no partner, "
        "left out of the pairing",
    ]
    assert notes[2].startswith("synthetic: 6 run(s) have no test_per_query.npz")  # made by hand: no bootstrap
    assert notes[2].endswith(" and 1 more")  # the first 5 named
    assert rows[1].outcomes() == "7/7"
    untested = make_run(tmp_path / "untested", regularizer="sgsl", seed=8, mAP=None)  # its test file lost
    (untested / "run.json").write_text(json.dumps({"status": "finished"}))
    runs = gather([tmp_path]).runs
    rows, _ = build_rows(runs, method_labels(runs))
    assert rows[1].outcomes() == "7/8: 1 no test metrics"  # trained to the end, but no test metrics


def test_without_shared_seeds_the_comparison_is_welch_and_says_so(tmp_path):
    base, mine = [0.70, 0.71, 0.69], [0.74, 0.72, 0.75]
    specs = [{"regularizer": "none", "seed": s, "mAP": v} for s, v in enumerate(base)]
    specs += [{"regularizer": "sgsl", "seed": 10 + s, "mAP": v} for s, v in enumerate(mine)]
    runs = _gathered(tmp_path, specs)
    rows, notes = build_rows(runs, method_labels(runs))
    difference = rows[1].metrics["mAP"].difference
    a, b = [100 * v for v in mine], [100 * v for v in base]
    assert difference.test == WELCH and difference.pairs == 0
    assert difference.p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert rows[1].metrics["mAP"].p_holm == pytest.approx(difference.p)  # alone in its family
    assert "sgsl vs none on synthetic: fewer than 2 shared seeds, so the unpaired Welch test" in notes[1]
    table = markdown_table(rows)
    assert f"| none: unpaired (Welch) | {difference.p:.3g} | n/a (unpaired) | n/a (unpaired) |" in table


def test_rows_differing_only_in_a_numeric_regularizer_option_are_a_search(tmp_path):
    specs = [{"regularizer": "none", "seed": s} for s in (0, 1)]
    specs += [
        {"regularizer": "constant_l2", "seed": s, "config": {"regularizer.constant_l2.lam": lam}}
        for lam in (0.001, 0.01)
        for s in (0, 1)
    ]
    runs = _gathered(tmp_path / "grid", specs)
    rows, notes = build_rows(runs, method_labels(runs))
    assert [(row.method, row.search) for row in rows] == [
        ("none", []),
        ("constant_l2 constant_l2.lam=0.001", ["constant_l2.lam"]),
        ("constant_l2 constant_l2.lam=0.01", ["constant_l2.lam"]),
    ]
    assert (
        "synthetic: the 2 constant_l2 rows are a search over constant_l2.lam: the best of them by its test "
        "score overstates it" in " ".join(notes)
    )
    assert "| constant_l2 constant_l2.lam=0.01 (search) | synthetic | 2/2 |" in markdown_table(rows)
    # Rows of one regularizer that differ in another setting are methods, not a search.
    other = [
        {"regularizer": "sgsl", "seed": 0, "config": {"trainer.max_epochs": epochs}} for epochs in (60, 120)
    ]
    runs = _gathered(tmp_path / "epochs", other)
    rows, notes = build_rows(runs, method_labels(runs))
    assert all(not row.search for row in rows) and not any("search" in note for note in notes)


def test_requested_baseline_and_missing_baseline(tmp_path):
    runs = _gathered(
        tmp_path, [{"regularizer": "sgsl", "mAP": 0.6}, {"regularizer": "adaptive_l2", "mAP": 0.5}]
    )
    rows, notes = build_rows(runs, method_labels(runs))
    assert all(row.metrics["mAP"].difference is None for row in rows)
    assert notes == [
        "synthetic: no baseline (a method without regularizer has no finished run on it), so no differences"
    ]
    rows, _ = build_rows(runs, method_labels(runs), baseline="adaptive_l2")
    assert rows[0].method == "adaptive_l2" and rows[1].metrics["mAP"].difference.delta == pytest.approx(10.0)


# ---------------------------------------------------------------------------------------------- plots
def test_lambda_curves_are_the_median_over_seeds_per_step(tmp_path):
    column = "reg/adaptive_l2/lambda_median/conv_kernel"
    rows_a = [{"step": 0, column: 0.0025}, {"step": 1, column: 0.0020}, {"step": 1, "train/loss": 1.0}]
    runs = [
        make_run(tmp_path / "a", regularizer="adaptive_l2", seed=0, lambda_rows=rows_a),
        make_run(
            tmp_path / "b", regularizer="adaptive_l2", seed=1, lambda_rows=[{"step": 0, column: 0.0025}]
        ),
        make_run(
            tmp_path / "c", regularizer="adaptive_l2", seed=2, lambda_rows=[{"step": 1, column: 0.0010}]
        ),
    ]
    histories = [lambda_history(run) for run in gather(runs).finished]
    assert histories[0] == {"conv_kernel": {0: 0.0025, 1: 0.0020}}  # the row without λ is skipped
    steps, median, low, high = over_seeds([h["conv_kernel"] for h in histories])
    assert steps == [0, 1]
    assert median == pytest.approx([0.0025, 0.0015]) and low == [0.0025, 0.0010] and high == [0.0025, 0.0020]
    _, written = report([tmp_path], out_dir=tmp_path / "out")
    assert [p.name for p in written] == [
        "report.md",
        "report.csv",
        "map.png",
        "lambda_median_adaptive_l2_synthetic.png",
    ]
    assert all(p.stat().st_size > 1000 for p in written[2:])


# ------------------------------------------------------------------ run.json: status, provenance, cost
# A run's provenance as reidreg.provenance.collect_provenance records it (test_provenance.py checks that
# every field the report compares is in a real one).
PROVENANCE: dict[str, Any] = {
    "versions": {
        "python": "3.11.7",
        "torch": "2.14.1+cu130",
        "cuda": "13.0",
        "hip": None,
        "cudnn": 92400,
        "lightning": "2.6.6",
        "timm": "1.0.31",
        "torchvision": "0.29.1",
        "numpy": "2.4.6",
        "reidreg": "0.1.0",
    },
    "git": {"commit": "c46f115a3811bb416b1cf0953e09c072d2991cc6", "dirty": False, "diff_sha256": None},
    "host": {"hostname": "vm", "platform": "Linux-6.1-x86_64", "cpu_model": "Xeon", "cpu_count": 2},
    "device": {"type": "cpu", "model": "Xeon", "count": 1, "capability": None, "memory_mib": None},
    "precision": "32-true",
    "numerics": {
        "float32_matmul_precision": "highest",
        "cuda_matmul_allow_tf32": False,
        "cudnn_allow_tf32": True,
        "deterministic_algorithms": False,
        "cudnn_benchmark": False,
    },
    "seed": 0,
    "dataset": {
        "name": "synthetic",
        "root": "/data/synthetic-v1-i200-c4-n16-128x64-d100-j50-s0",
        "splits": {
            "train": {"images": 1600, "ids": 100},
            "query": {"images": 390, "ids": 100},
            "gallery": {"images": 1360, "ids": 250},
        },
        "listing_sha256": "0" * 64,
        "held_out": {
            "train": {"images": 1520, "ids": 95},
            "val_query": {"images": 19, "ids": 5},
            "val_gallery": {"images": 61, "ids": 5},
        },
        "synthetic": {"generator_version": 1, "preset": "quickstart", "num_ids": 200, "seed": 0},
    },
    "command": ["-m", "reidreg.train", "experiment=quickstart"],
}


@pytest.fixture
def provenance() -> dict[str, Any]:
    return json.loads(json.dumps(PROVENANCE))


def write_run_json(
    run_dir: Path,
    provenance: dict[str, Any] | None,
    *,
    status: str = "finished",
    reason: str | None = None,
    changes: dict[str, Any] | None = None,
    img_per_s: float | None = None,
    peak_memory_mib: float | None = None,
) -> Path:
    """run.json as reidreg.train writes it (COMMON.md layout); ``changes``: dotted provenance keys to set."""
    provenance = json.loads(json.dumps(provenance)) if provenance is not None else None
    for key, value in (changes or {}).items():
        node = provenance
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    info = {
        "status": status,
        "reason": reason,
        "started_at": "2025-01-01T10:00:00+00:00",
        "ended_at": None if status == "running" else "2025-01-01T10:05:00+00:00",
        "wall_time_s": None if status == "running" else 300.0,
        "provenance": provenance,
        "performance": {
            "train_img_per_s": img_per_s,
            "train_ms_per_step": None if img_per_s is None else 1000 * 64 / img_per_s,
            "peak_memory_mib": peak_memory_mib,
        },
        "resumes": [],
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    return run_dir


def test_runs_in_different_precisions_are_refused_unless_mixing_is_allowed(tmp_path, provenance):
    # Two quickstart-like runs of the baseline, one in 32-bit, one in bf16 mixed precision.
    quickstart = {"trainer.max_epochs": 15, "backbone.name": "test_resnet"}
    a = make_run(tmp_path / "a", seed=0, mAP=0.5997, config=quickstart)
    b = make_run(tmp_path / "b", seed=1, mAP=0.5914, config=quickstart)
    write_run_json(a, provenance)
    write_run_json(b, provenance, changes={"precision": "bf16-mixed"})
    difference = (
        "synthetic: runs differ in precision: 32-true (1 run: `a` (none, seed 0)); "
        "bf16-mixed (1 run: `b` (none, seed 1))"
    )
    with pytest.raises(ConfigError, match=re.escape(difference)):
        report([a, b], plots=False)
    assert not (tmp_path / "report.md").exists()  # refused before writing anything

    text, _ = report([a, b], plots=False, allow_mixed=True)
    assert f"- {difference}" in text
    assert text.index("Mixed comparison (--allow-mixed)") < text.index("| method |")  # above the table
    shared = text.split("Shared by every run compared that has a run.json: ")[1].split("\n")[0]
    assert f"torch {provenance['versions']['torch']}" in shared and "precision 32-true" not in shared
    assert "| none | synthetic | 2/2 | 59.55 ± 0.59 | baseline |" in text  # reported, marked as mixed

    # The same environment: no refusal, no warning.
    write_run_json(b, provenance)
    text, _ = report([a, b], plots=False)
    assert "Warning" not in text and "Mixed" not in text and "precision 32-true" in text


def test_fields_that_split_the_runs_alike_share_one_warning(tmp_path, provenance):
    new_torch = {"versions.torch": "2.5.0+cu124", "versions.cuda": "12.4"}
    specs = [
        ("none", 0, {}),
        ("none", 1, new_torch),
        ("sgsl", 0, new_torch),
        ("sgsl", 1, {**new_torch, "device.model": "Other CPU"}),
    ]
    for index, (regularizer, seed, changes) in enumerate(specs):
        run = make_run(tmp_path / str(index), regularizer=regularizer, seed=seed, job_num=index)
        write_run_json(run, provenance, changes=changes)
    # A second dataset is another dataset by design: its identity is not compared with synthetic's.
    other = make_run(tmp_path / "4", dataset="market1501", job_num=4)
    write_run_json(
        other, provenance, changes={"dataset.name": "market1501", "dataset.listing_sha256": "f" * 64}
    )
    text, _ = report([tmp_path], plots=False)
    warnings = [line for line in text.splitlines() if line.startswith("- synthetic: runs differ")]
    assert warnings == [
        "- synthetic: runs differ in torch, CUDA: "
        f"torch {provenance['versions']['torch']}, CUDA {provenance['versions']['cuda']} "
        "(1 run: `0` (none, seed 0)); "
        "torch 2.5.0+cu124, CUDA 12.4 (3 runs: `1` (none, seed 1), `2` (sgsl, seed 0), `3` (sgsl, seed 1))",
        f"- synthetic: runs differ in device model: {provenance['device']['model']} "
        "(3 runs: `0` (none, seed 0), `1` (none, seed 1), `2` (sgsl, seed 0)); "
        "Other CPU (1 run: `3` (sgsl, seed 1))",
    ]
    assert "market1501: runs differ" not in text


def test_cost_columns_show_their_spread_and_flag_a_run_slowed_down(tmp_path, provenance):
    specs = [  # regularizer, seed, img/s, peak MiB
        ("none", 0, 100.0, 500.0),
        ("none", 1, 110.0, 510.0),
        ("none", 2, 90.0, 505.0),
        ("adversarial", 0, 64.0, 700.0),
        ("adversarial", 1, 66.0, 720.0),
        ("adversarial", 2, 65.0, 710.0),
        ("adversarial", 3, 30.0, 705.0),  # slowed by background load: 30 < 64.5 / 1.5
    ]
    adversarial = {"regularizer.adversarial": {"_target_": "reidreg.regularizers.adversarial.Adversarial"}}
    for index, (regularizer, seed, speed, memory) in enumerate(specs):
        config = adversarial if regularizer == "adversarial" else {}
        run = make_run(tmp_path / str(index), seed=seed, job_num=index, config=config)
        write_run_json(run, provenance, img_per_s=speed, peak_memory_mib=memory)
    make_run(tmp_path / "7", regularizer="sgsl", job_num=7)  # made before run.json: cost unknown
    text, _ = report([tmp_path], plots=False)
    cost = text.split("### Cost")[1].split("\n\n")[1]
    assert cost.splitlines()[0] == (
        "| method | dataset | img/s median (min–max) | img/s ÷ base | peak MiB max (min–max) | flag |"
    )
    rows = {line.split(" | ")[0][2:]: line for line in cost.splitlines()[2:]}
    assert rows["none"] == "| none | synthetic | 100.0 (90.0–110.0) | baseline | 510 (500–510) |  |"
    assert rows["adversarial"] == (
        "| adversarial | synthetic | 64.5 (30.0–66.0) | 0.65 | 720 (700–720) "
        "| 1 run(s) > 1.5× off the median img/s |"
    )
    assert rows["sgsl"] == "| sgsl | synthetic | n/a | n/a | n/a |  |"
    assert (
        f"adversarial on synthetic: throughput of `{tmp_path / '6'}` (30.0 img/s) is more than 1.5× off the "
        "method's median (64.5 img/s)"
    ) in text
    assert "flag: runs whose throughput is more than 1.5× above or below their method's median" in text
    assert "1 of the 8 runs in the table have no run.json" in text and f"`{tmp_path / '7'}`" in text
    with (tmp_path / "report.csv").open() as file:
        csv_rows = {row["method"]: row for row in csv.DictReader(file)}
    adversarial = csv_rows["adversarial"]
    assert float(adversarial["train_img_per_s_median"]) == pytest.approx(64.5)
    assert float(adversarial["train_img_per_s_ratio"]) == pytest.approx(0.645)
    assert adversarial["train_img_per_s_values"] == "64.00;66.00;65.00;30.00"
    assert adversarial["train_img_per_s_outliers"] == str(tmp_path / "6")
    assert float(adversarial["train_ms_per_step_median"]) == pytest.approx(
        np.median([64000 / v for v in (64, 66, 65, 30)])
    )
    assert float(adversarial["peak_memory_mib_max"]) == pytest.approx(720.0)
    assert float(csv_rows["none"]["train_img_per_s_ratio"]) == pytest.approx(1.0)
    assert csv_rows["none"]["train_img_per_s_outliers"] == ""
    assert csv_rows["sgsl"]["train_img_per_s_median"] == "" and csv_rows["sgsl"]["peak_memory_mib_max"] == ""


def test_two_seeds_far_apart_in_throughput_are_both_flagged():
    """With two runs the median is their middle: neither can be trusted, both are named."""
    runs = [
        Run(Path(f"/r{i}"), {"seed": i}, {}, info={"performance": {"train_img_per_s": v}})
        for i, v in enumerate((60.6, 229.7))
    ]
    assert [value for _, value in Cost.of(runs).outliers] == [60.6, 229.7]
    close = [Run(Path("/a"), {}, {}, info={"performance": {"train_img_per_s": v}}) for v in (100.0, 140.0)]
    assert Cost.of(close).outliers == []


def test_diverged_failed_and_interrupted_runs_are_listed_and_never_averaged(tmp_path, provenance):
    ok = make_run(tmp_path / "0", seed=0, mAP=0.50)
    write_run_json(ok, provenance)
    # Diverged and failed runs that still left a normal-looking test_metrics.json behind.
    diverged = make_run(tmp_path / "1", seed=1, mAP=0.01)
    write_run_json(diverged, provenance, status="diverged", reason="train/loss is nan at step 3 (epoch 0)")
    failed = make_run(tmp_path / "2", seed=2, mAP=0.90)
    write_run_json(
        failed,
        provenance,
        status="failed",
        reason="RuntimeError: CUDA out of memory",
        changes={"precision": "bf16-mixed"},  # differs, but the run is not compared: no warning
    )
    interrupted = make_run(tmp_path / "3", seed=3, mAP=None)
    write_run_json(interrupted, provenance, status="interrupted", reason="SIGTERM (preempted)")
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    running = make_run(tmp_path / "4", seed=4, mAP=0.70)
    write_run_json(running, provenance, status="running")
    unreadable = make_run(tmp_path / "5", seed=5, mAP=0.70)
    (unreadable / "run.json").write_text('{"status": "fini')  # cut short
    legacy_failed = make_run(tmp_path / "6", seed=6, mAP=None)

    study = gather([tmp_path])
    assert [run.run_dir.name for run in study.finished] == ["0"]
    assert [run.status for run in study.unfinished] == [
        "diverged",
        "failed",
        "interrupted",
        "running",
        "unreadable",
        None,
    ]
    text, _ = report([tmp_path], plots=False)
    # Every run is counted in its method's row, by outcome; only the finished one is averaged.
    assert (
        "| none | synthetic | 1/7: 1 diverged, 1 failed, 1 interrupted, 1 running, 1 unreadable, "
        "1 no test metrics | 50.00 | baseline |"
    ) in text
    assert "Warning" not in text
    section = text.split("## Unfinished or failed runs (6), counted in the table, never averaged")[1]
    assert section.startswith(
        " (1 diverged, 1 failed, 1 interrupted, 1 running, 1 unreadable, 1 status unknown)"
    )
    assert (
        f"- `{diverged}`: none on synthetic, seed 1: **diverged**: train/loss is nan at step 3 (epoch 0); "
        "its test_metrics.json is ignored\n"
    ) in section
    assert (
        f"`{failed}`: none on synthetic, seed 2: **failed**: RuntimeError: CUDA out of memory; its" in section
    )
    assert f"`{interrupted}`: none on synthetic, seed 3: **interrupted**: SIGTERM (preempted)\n" in section
    assert f"resume with `ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}`" in section
    assert f"`{running}`: none on synthetic, seed 4: **running** (still running, or killed before" in section
    assert (
        f"`{unreadable}`: none on synthetic, seed 5: **unreadable**: run.json is not valid JSON (" in section
    )
    assert (
        f"`{legacy_failed}`: none on synthetic, seed 6: "
        "no test_metrics.json: failed, stopped or still running (no run.json: status unknown)"
    ) in section
    with (tmp_path / "report.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [
        (row["method"], row["n"], row["finished"], row["launched"], row["mAP_values"]) for row in rows
    ] == [("none", "1", "1", "7", "50.0000")]


def test_report_cli_refuses_mixed_precisions_unless_allowed(tmp_path, provenance):
    """``python -m reidreg.report`` as typed: one error line naming the field and the runs, nothing
    written; with ``--allow-mixed`` the difference is printed and written above the table."""
    import subprocess
    import sys

    write_run_json(make_run(tmp_path / "a", seed=0, mAP=0.60), provenance)
    write_run_json(make_run(tmp_path / "b", seed=1, mAP=0.59), provenance, changes={"precision": "16-mixed"})
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "reidreg.report", str(tmp_path), "--no-plots"]
    refused = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    line = "synthetic: runs differ in precision: 32-true (1 run: `a` (none, seed 0)); 16-mixed (1 run: `b`"
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and line in refused.stderr
    assert not (tmp_path / "report.md").exists()

    allowed = [*command, "--allow-mixed"]
    result = subprocess.run(allowed, cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"- {line}" in result.stdout and f"- {line}" in (tmp_path / "report.md").read_text()
    assert "Mixed comparison (--allow-mixed)" in result.stdout


# ------------------------------------------------------------------------------------------ real runs
def test_a_study_of_real_tiny_runs_with_one_diverging(tmp_path, tiny_config):
    """2 methods × 2 seeds trained and tested for real, and a third method whose only run diverges."""
    from reidreg.errors import ReIDRegError
    from reidreg.per_query import PerQuery
    from reidreg.train import train

    study = tmp_path / "study"
    jobs = [("none", 0), ("none", 1), ("sgsl", 0), ("sgsl", 1)]
    for index, (regularizer, seed) in enumerate(jobs):
        train(
            tiny_config(
                "trainer.max_epochs=1",
                f"regularizer={regularizer}",
                f"seed={seed}",
                f"paths.output_dir={study / str(index)}",
            )
        )
    with pytest.raises(ReIDRegError, match="diverged"):
        train(
            tiny_config(
                "trainer.max_epochs=1",
                "optim.optimizer.lr=1e6",
                "optim.schedule.warmup_epochs=0",
                f"paths.output_dir={study / '4'}",
            )
        )
    text, _ = report([study], plots=False, samples=500)
    with (study / "report.csv").open() as file:
        rows = {
            row["method"].split(" ")[0] + ("*" if "lr=1000000" in row["method"] else ""): row
            for row in csv.DictReader(file)
        }
    # The diverged run keeps its own row (another learning rate: another experiment), counted, not averaged.
    diverged = rows["none*"]
    assert (diverged["finished"], diverged["launched"], diverged["n"]) == ("0", "1", "0")
    assert "| 0/1: 1 diverged | — (no finished run) |" in text
    # The paired comparison equals scipy on the runs' own test metrics, seed by seed.
    metrics = {
        job: json.loads((study / str(i) / "test_metrics.json").read_text()) for i, job in enumerate(jobs)
    }
    base = [100 * metrics[("none", s)]["test/mAP"] for s in (0, 1)]
    mine = [100 * metrics[("sgsl", s)]["test/mAP"] for s in (0, 1)]
    sgsl = rows["sgsl"]
    assert sgsl["mAP_test"] == "paired t" and sgsl["mAP_pairs"] == "2"
    assert float(sgsl["mAP_delta"]) == pytest.approx(np.mean(np.subtract(mine, base)))
    if np.ptp(np.subtract(mine, base)) > 0:
        assert float(sgsl["mAP_p"]) == pytest.approx(scipy_stats.ttest_rel(mine, base).pvalue)
    # The bootstrap read every run's per-query file, whose mean AP is the run's mAP exactly.
    for index in range(4):
        per_query = PerQuery.load(study / str(index) / "test_per_query.npz")
        assert per_query.mean_ap() == metrics[jobs[index]]["test/mAP"]
    assert float(sgsl["mAP_bootstrap_low"]) <= float(sgsl["mAP_bootstrap_high"])
    assert 0.0 <= float(sgsl["mAP_p_improvement"]) <= 1.0
