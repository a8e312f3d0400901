"""``reidreg.report`` on hand-made run directories: statistics against their formulas, method names,
missing and failed runs, the written table and plots. (A real study goes through it in test_sweeps.py.)"""

from __future__ import annotations

import csv
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
    assert "| none | synthetic | 2 | 59.55 ± 0.59 | baseline |" in text  # reported, marked as mixed

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


def test_speed_and_memory_columns_with_the_ratio_to_the_baseline(tmp_path, provenance):
    specs = [  # regularizer, seed, img/s, peak MiB
        ("none", 0, 100.0, 500.0),
        ("none", 1, 110.0, 510.0),
        ("none", 2, 90.0, 505.0),
        ("adversarial", 0, 64.0, 700.0),
        ("adversarial", 1, 66.0, 720.0),
        ("adversarial", 2, 65.0, 710.0),
    ]
    adversarial = {"regularizer.adversarial": {"_target_": "reidreg.regularizers.adversarial.Adversarial"}}
    for index, (regularizer, seed, speed, memory) in enumerate(specs):
        config = adversarial if regularizer == "adversarial" else {}
        run = make_run(tmp_path / str(index), seed=seed, job_num=index, config=config)
        write_run_json(run, provenance, img_per_s=speed, peak_memory_mib=memory)
    make_run(tmp_path / "6", regularizer="sgsl", job_num=6)  # made before run.json: cost unknown
    text, _ = report([tmp_path], plots=False)
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert header.endswith("| p | img/s | img/s ÷ base | peak MiB |")
    assert "| none | synthetic | 3 | 50.00 ± 0.00 | baseline |" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["none"].endswith("| 100.0 | baseline | 510 |")  # median img/s; largest peak memory
    assert rows["adversarial"].endswith("| 65.0 | 0.65 | 720 |")
    assert rows["sgsl"].endswith("| n/a | n/a | n/a |")
    assert "1 of the 7 runs in the table have no run.json" in text and f"`{tmp_path / '6'}`" in text
    with (tmp_path / "report.csv").open() as file:
        csv_rows = {row["method"]: row for row in csv.DictReader(file)}
    adversarial = csv_rows["adversarial"]
    assert float(adversarial["train_img_per_s_median"]) == pytest.approx(65.0)
    assert float(adversarial["train_img_per_s_ratio"]) == pytest.approx(0.65)
    assert adversarial["train_img_per_s_values"] == "64.00;66.00;65.00"
    assert float(adversarial["train_ms_per_step_median"]) == pytest.approx(64000 / 65)
    assert float(adversarial["peak_memory_mib_max"]) == pytest.approx(720.0)
    assert float(csv_rows["none"]["train_img_per_s_ratio"]) == pytest.approx(1.0)
    assert csv_rows["sgsl"]["train_img_per_s_median"] == "" and csv_rows["sgsl"]["peak_memory_mib_max"] == ""


def test_diverged_failed_and_interrupted_runs_are_listed_and_never_averaged(tmp_path, provenance):
    ok = make_run(tmp_path / "0", seed=0, mAP=0.50)
    write_run_json(ok, provenance)
    # Diverged and failed runs that still left a normal-looking test_metrics.json behind.
    diverged = make_run(tmp_path / "1", seed=1, mAP=0.01, config={"optim.optimizer.lr": 1e6})
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
    assert "| none | synthetic | 1 | 50.00 | baseline |" in text  # only the finished run is averaged
    assert "Warning" not in text
    section = text.split("## Unfinished or failed runs (6), not in the table and never averaged")[1]
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
    assert [(row["method"], row["n"], row["mAP_values"]) for row in rows] == [("none", "1", "50.0000")]


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
