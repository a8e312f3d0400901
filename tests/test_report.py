"""``reidreg.report`` on hand-made run directories: statistics against their formulas, method names,
missing and failed runs, the written table and plots. (A real study goes through it in test_sweeps.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from reidreg.report import main, report
from reidreg.reporting.gather import expected_jobs, gather
from reidreg.reporting.methods import comparability_notes, method_labels
from reidreg.reporting.plots import lambda_history, over_seeds
from reidreg.reporting.stats import holm_adjust, summarize, welch_p_value
from reidreg.reporting.table import build_rows, markdown_table

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


def test_welch_p_value_matches_the_welch_satterthwaite_formula():
    a, b = [70.1, 71.3, 70.8], [68.2, 69.9, 68.7, 69.0]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    expected = 2 * scipy_stats.t.sf(abs(t), dof)
    assert welch_p_value(a, b) == pytest.approx(expected, rel=1e-10)
    assert 0.0 < expected < 0.05  # a clear difference on this example


def test_welch_p_value_is_undefined_without_two_seeds_or_without_variance():
    assert welch_p_value([70.0], [69.0, 68.0]) is None
    assert welch_p_value([70.0, 70.0], [69.0, 69.0]) is None


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


def test_report_lists_failed_and_missing_runs_and_leaves_them_out_of_the_table(tmp_path):
    sweep = _study_with_a_failed_and_a_missing_job(tmp_path)
    text, written = report([sweep], plots=False)
    assert "## Unfinished or failed runs (1)" in text
    assert f"`{sweep / '2'}`: sgsl on synthetic, seed 0" in text
    assert "regularizer=sgsl seed=0 dataset=synthetic" in text
    assert f"job log `{sweep / '2' / 'train.log'}`" in text
    assert "## Missing runs (1)" in text and "job 3:" in text
    with (sweep / "report.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["n"]) for row in rows] == [("none", "2")]
    assert written == [sweep / "report.md", sweep / "report.csv"]
    assert (sweep / "report.md").read_text() == text


def test_runs_of_several_directories_and_no_runs(tmp_path, capsys):
    make_run(tmp_path / "a" / "run", regularizer="none", mAP=0.5)
    make_run(tmp_path / "b" / "run", regularizer="sgsl", mAP=0.6)
    assert main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--no-plots"]) == 0
    assert (tmp_path / "report.md").is_file()  # the common parent
    assert "| sgsl | synthetic | 1 | 60.00 | +10.00 | n/a |" in capsys.readouterr().out
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
def test_rows_compare_each_method_with_the_baseline_of_its_dataset(tmp_path):
    values = {
        ("none", "market1501"): [0.70, 0.71, 0.72],
        ("sgsl", "market1501"): [0.75, 0.76, 0.78],
        ("adaptive_l2", "market1501"): [0.705, 0.715, 0.72],
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
    assert notes == []
    assert [(row.method, row.dataset) for row in rows] == [
        ("none", "market1501"),
        ("sgsl", "market1501"),
        ("adaptive_l2", "market1501"),
        ("none", "dukemtmc"),
        ("sgsl", "dukemtmc"),
    ]
    base = [100 * v for v in values[("none", "market1501")]]
    p_values = []
    for row in rows[1:3]:
        mine = [100 * v for v in values[(row.method, "market1501")]]
        comparison = row.metrics["mAP"]
        assert comparison.summary.mean == pytest.approx(np.mean(mine))
        assert comparison.summary.std == pytest.approx(np.std(mine, ddof=1))
        assert comparison.delta == pytest.approx(np.mean(mine) - np.mean(base))
        assert comparison.p == pytest.approx(scipy_stats.ttest_ind(mine, base, equal_var=False).pvalue)
        p_values.append(comparison.p)
    # Holm over the two methods compared with `none` on market1501
    smaller, larger = sorted(p_values)
    holm = {smaller: min(1, 2 * smaller), larger: max(min(1, 2 * smaller), larger)}
    for row in rows[1:3]:
        assert row.metrics["mAP"].p_holm == pytest.approx(holm[row.metrics["mAP"].p])
        assert row.metrics["mAP"].significant == (holm[row.metrics["mAP"].p] < 0.05)
    assert rows[1].metrics["mAP"].significant  # sgsl: +5.7 points, std ~1
    assert not rows[2].metrics["mAP"].significant  # adaptive_l2: +0.3 points
    # mINP is stored as mAP / 2 in these runs
    assert rows[1].metrics["mINP"].summary.mean == pytest.approx(np.mean([75, 76, 78]) / 2)
    # dukemtmc: one baseline seed, no test
    assert rows[4].metrics["mAP"].p is None and rows[4].metrics["mAP"].significant is None
    table = markdown_table(rows)
    assert "| sgsl | market1501 | 3 | 76.33 ± 1.53 | +5.33* |" in table
    assert "| none | dukemtmc | 1 | 58.00 | baseline |" in table
    assert "| sgsl | dukemtmc | 2 | 60.50 ± 0.71 | +2.50 | n/a |" in table


def test_requested_baseline_and_missing_baseline(tmp_path):
    runs = _gathered(
        tmp_path, [{"regularizer": "sgsl", "mAP": 0.6}, {"regularizer": "adaptive_l2", "mAP": 0.5}]
    )
    rows, notes = build_rows(runs, method_labels(runs))
    assert all(row.metrics["mAP"].delta is None for row in rows)
    assert notes == [
        "synthetic: no baseline (a method without regularizer has no run on it), so no differences are shown"
    ]
    rows, _ = build_rows(runs, method_labels(runs), baseline="adaptive_l2")
    assert rows[0].method == "adaptive_l2" and rows[1].metrics["mAP"].delta == pytest.approx(10.0)


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
