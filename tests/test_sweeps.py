"""The studies of sweeps/: every file composes with every value it sweeps, the W&B sweeps name existing
parameters and match their Hydra studies, the SLURM launcher matches the trainer's devices, and a tiny
study runs end to end (basic and submitit launchers) into a report whose numbers are the runs' own."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from reidreg.report import report
from reidreg.utils.config import register_resolvers, regularizer_name
from tests.conftest import CONF_DIR, TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
STUDIES = sorted(path.stem for path in SWEEPS.glob("*.yaml"))
WANDB_STUDIES = sorted(path.stem for path in (SWEEPS / "wandb").glob("*.yaml"))
HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
PARSER = OverridesParser.create()
TINY_STUDY = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_epochs")] + [
    "trainer.max_epochs=1",
    "experiment=quickstart",  # instead of the studies' paper recipe (20 frozen epochs, 200 steps each)
]


def study_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())


def uses_optuna(study: dict[str, Any]) -> bool:
    return {"override hydra/sweeper": "optuna"} in study["defaults"]


def group_overrides(study: dict[str, Any]) -> list[str]:
    """The study's ``override <group>: <option>`` defaults, as command-line overrides (not hydra/*)."""
    entries = [entry for entry in study["defaults"] if isinstance(entry, dict)]
    return [
        f"{key.removeprefix('override ')}={option}"
        for entry in entries
        for key, option in entry.items()
        if not key.removeprefix("override ").startswith("hydra/")
    ]


def compose_study(name: str, *overrides: str) -> DictConfig:
    """The config ``python -m reidreg.train --config-dir sweeps --config-name <name> <overrides>`` runs.

    Without the optional Optuna plugin an Optuna study cannot be composed as a whole; its task config
    is then the train config with the study's group overrides.
    """
    register_resolvers()
    study = study_file(name)
    if uses_optuna(study) and not HAS_OPTUNA:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[*group_overrides(study), *overrides], return_hydra_config=True)
    with initialize_config_dir(str(SWEEPS), version_base="1.3"):
        return compose(
            name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides], return_hydra_config=True
        )


def swept_values(key: str, value: Any) -> list[Any]:
    """The values a Hydra sweep parameter takes: each of a list, both ends of an interval, or its value."""
    override = PARSER.parse_override(f"{key}={value}")
    if override.is_discrete_sweep():
        return list(override.sweep_iterator())
    if isinstance(override.value(), IntervalSweep):
        return [override.value().start, override.value().end]
    return [override.value()]


def assert_applied(cfg: DictConfig, key: str, value: Any) -> None:
    """``key=value`` reached the config: the group's chosen option, or the key's value."""
    if (Path(CONF_DIR) / key).is_dir():
        assert cfg.hydra.runtime.choices[key] == value, key
    else:
        selected = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert selected == (pytest.approx(value) if isinstance(value, float) else value), key


def check_parameters(compose_with, parameters: dict[str, list[Any]]) -> None:
    """Every value of every parameter composes, the others at their first value, and lands in the config."""
    first = {key: values[0] for key, values in parameters.items()}
    for key, values in parameters.items():
        for value in values:
            overrides = {**first, key: value}
            cfg = compose_with(*(f"{k}={v}" for k, v in overrides.items()))
            for k, v in overrides.items():
                assert_applied(cfg, k, v)


# ------------------------------------------------------------------------------------------ composition
def test_every_study_has_its_wandb_version():
    assert {"compare_regularizers", "ablation_table3", "l2_search_constant", "l2_search_adaptive"} <= set(
        STUDIES
    )
    assert WANDB_STUDIES == STUDIES


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_composes_with_every_value_it_sweeps(name):
    params = study_file(name)["hydra"]["sweeper"]["params"]
    check_parameters(
        lambda *overrides: compose_study(name, *overrides),
        {key: swept_values(key, value) for key, value in params.items()},
    )


def test_every_regularizer_is_compared_once():
    params = study_file("compare_regularizers")["hydra"]["sweeper"]["params"]
    compared = [
        regularizer_name(compose_study("compare_regularizers", f"regularizer={option}").regularizer)
        for option in swept_values("regularizer", params["regularizer"])
    ]
    assert sorted(compared) == sorted(path.stem for path in (Path(CONF_DIR) / "regularizer").glob("*.yaml"))


def test_linr_in_a_study_refines_the_last_epochs_of_the_recipe_budget():
    cfg = compose_study("compare_regularizers", "regularizer=linr_end")
    linr = cfg.regularizer.linr
    refinement_epochs = linr.rounds * (linr.cls_steps + linr.linr_steps) / cfg.data.steps_per_epoch
    assert linr.start_epoch + refinement_epochs == cfg.trainer.max_epochs
    assert linr.start_epoch >= cfg.freeze_backbone_epochs


def test_ablation_runs_the_six_rows_of_table_3():
    params = study_file("ablation_table3")["hydra"]["sweeper"]["params"]
    rows = {path.stem for path in (Path(CONF_DIR) / "experiment").glob("table3_*.yaml")}
    assert swept_values("experiment", params["experiment"]) == sorted(rows)
    assert len(rows) == 6


@pytest.mark.skipif(not HAS_OPTUNA, reason="optional extra: pip install -e '.[optuna]'")
@pytest.mark.parametrize("name", ["l2_search_constant", "l2_search_adaptive"])
def test_l2_searches_use_optuna_with_the_same_budget(name):
    cfg = compose_study(name)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    other = compose_study("l2_search_adaptive" if name == "l2_search_constant" else "l2_search_constant")
    assert cfg.hydra.sweeper.n_trials == other.hydra.sweeper.n_trials
    assert cfg.hydra.sweeper.sampler == other.hydra.sweeper.sampler


# ----------------------------------------------------------------------------------------- W&B sweeps
def wandb_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((SWEEPS / "wandb" / f"{name}.yaml").read_text())


def wandb_values(spec: dict[str, Any]) -> list[Any]:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def fixed_overrides(sweep: dict[str, Any]) -> list[str]:
    """The overrides the sweep's command passes besides the agent's parameters (--config-dir as one)."""
    command = [str(part) for part in sweep["command"]]
    overrides = []
    for part in command[command.index("reidreg.train") + 1 :]:
        if part.startswith("--config-dir="):
            overrides.append(f"hydra.searchpath=[file://{REPO / part.removeprefix('--config-dir=')}]")
        elif not (part.startswith("${") and part.endswith("}")):
            overrides.append(part)
    return overrides


@pytest.mark.parametrize("name", WANDB_STUDIES)
def test_wandb_sweep_is_well_formed_and_names_existing_parameters(name, monkeypatch):
    sweep = wandb_file(name)
    assert sweep["method"] in {"grid", "random", "bayes"}
    # Searches select on, and grids display, the validation hold-out's score: never the test set's.
    assert sweep["metric"] == {"name": "val/best_mAP", "goal": "maximize"}
    assert sweep["program"]  # the agent needs it even when the command does not run it
    assert sweep["command"][:4] == ["${env}", "${interpreter}", "-m", "reidreg.train"]
    assert sweep["command"][-1] == "${args_no_hyphens}"  # key=value, as Hydra reads them
    assert "logger=wandb" in fixed_overrides(sweep)
    for spec in sweep["parameters"].values():
        assert len({"value", "values", "distribution"} & set(spec)) == 1, spec

    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run456")

    def compose_run(*overrides: str) -> DictConfig:
        register_resolvers()
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[*fixed_overrides(sweep), *overrides], return_hydra_config=True)

    # The first value of each (the other values are the Hydra study's, composed in its own test).
    first = {key: wandb_values(spec)[0] for key, spec in sweep["parameters"].items()}
    cfg = compose_run(*(f"{key}={value}" for key, value in first.items()))
    for key, value in first.items():
        assert_applied(cfg, key, value)
    assert cfg.hydra.run.dir == "outputs/wandb/sweep123/run456"
    assert "wandb" in cfg.logger


@pytest.mark.parametrize("name", WANDB_STUDIES)
def test_wandb_sweep_runs_what_its_hydra_study_runs(name):
    """Same parameters and values; a key the Hydra study does not sweep is fixed by its config."""
    sweep, study = wandb_file(name), study_file(name)
    params = study["hydra"]["sweeper"]["params"]
    default = compose_study(name)
    hydra_side = {}
    for key in sweep["parameters"]:
        if key in params:
            hydra_side[key] = swept_values(key, params[key])
        elif (Path(CONF_DIR) / key).is_dir():
            hydra_side[key] = [default.hydra.runtime.choices[key]]
        else:
            hydra_side[key] = [OmegaConf.select(default, key)]
    assert set(params) <= set(sweep["parameters"])
    for key, spec in sweep["parameters"].items():
        if "distribution" in spec:  # a search range: the same ends, log scale on both sides
            assert wandb_values(spec) == pytest.approx(hydra_side[key]), key
            assert spec["distribution"] == "log_uniform_values"
            assert "log" in PARSER.parse_override(f"{key}={params[key]}").value().tags
        else:
            assert wandb_values(spec) == hydra_side[key], key
    if sweep["method"] == "bayes":
        assert sweep["run_cap"] == study["hydra"]["sweeper"]["n_trials"]


# --------------------------------------------------------------------------------------------- SLURM
def test_slurm_launcher_gives_each_run_its_trainer_devices():
    cfg = compose_study(
        "compare_regularizers",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    )
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra builds it: interpolations resolved
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["gpus_per_node"] == launcher.params["tasks_per_node"] == 4
    assert launcher.params["nodes"] == 2
    single = instantiate(compose_study("ablation_table3", "hydra/launcher=slurm").hydra.launcher)
    assert single.params["gpus_per_node"] == single.params["tasks_per_node"] == 1


# ---------------------------------------------------------------------------------------- end to end
def run_study(
    sweep_dir: Path, data_dir: Path, *overrides: str, study: str = "compare_regularizers"
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        "-m",
        "--config-dir",
        "sweeps",
        "--config-name",
        study,
        *TINY_STUDY,
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    """2 regularizers × 2 seeds of compare_regularizers, on tiny synthetic data, 1 epoch each."""
    sweep_dir = tmp_path_factory.mktemp("study") / "sweep"
    run_study(sweep_dir, tmp_path_factory.getbasetemp() / "data", "regularizer=none,adaptive_l2", "seed=0,1")
    return sweep_dir


def test_tiny_study_report_matches_the_runs_own_metrics(tiny_study):
    text, written = report([tiny_study])
    saved = {}
    for job in ("0", "1", "2", "3"):
        run_config = yaml.safe_load((tiny_study / job / "config.yaml").read_text())
        method = "+".join(sorted(run_config["regularizer"])) or "none"
        metrics = json.loads((tiny_study / job / "test_metrics.json").read_text())
        saved.setdefault(method, []).append({k: 100 * metrics[f"test/{k}"] for k in ("mAP", "R1", "mINP")})
    assert sorted(saved) == ["adaptive_l2", "none"] and all(len(v) == 2 for v in saved.values())

    with (tiny_study / "report.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["dataset"], row["n"]) for row in rows] == [
        ("none", "synthetic", "2"),
        ("adaptive_l2", "synthetic", "2"),
    ]
    for row in rows:
        for metric in ("mAP", "R1", "mINP"):
            values = [seed[metric] for seed in saved[row["method"]]]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
    base = [seed["mAP"] for seed in saved["none"]]
    mine = [seed["mAP"] for seed in saved["adaptive_l2"]]
    assert float(rows[1]["mAP_delta"]) == pytest.approx(np.mean(mine) - np.mean(base))
    # Seeds 0 and 1 on both sides: a paired comparison, with the bootstrap of the runs' per-query results.
    assert rows[1]["mAP_test"] == "paired t" and rows[1]["mAP_pairs"] == "2"
    if np.ptp(np.subtract(mine, base)) == 0:  # both seeds moved by the same amount: no test
        assert rows[1]["mAP_p"] == ""
    else:
        assert float(rows[1]["mAP_p"]) == pytest.approx(stats.ttest_rel(mine, base).pvalue)
    assert float(rows[1]["mAP_bootstrap_low"]) <= float(rows[1]["mAP_bootstrap_high"])
    assert "## Unfinished" not in text and "## Missing runs" not in text
    assert {path.name for path in written} >= {"report.md", "report.csv", "map.png"}
    assert (tiny_study / "lambda_median_adaptive_l2_synthetic.png").is_file()


def test_tiny_study_with_a_failed_and_a_missing_job_lists_both(tiny_study, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_study, sweep, ignore=shutil.ignore_patterns("checkpoints", "*.png", "report.*"))
    (sweep / "1" / "test_metrics.json").unlink()  # job 1 (none, seed 1) failed
    shutil.rmtree(sweep / "3")  # job 3 (adaptive_l2, seed 1) never started
    text, _ = report([sweep], plots=False)
    unfinished = text.split("## Unfinished or failed runs (1)")[1].split("## Missing runs (1)")[0]
    assert f"`{sweep / '1'}`: none on synthetic, seed 1" in unfinished
    assert "regularizer=none" in unfinished and "seed=1" in unfinished
    assert f"job log `{sweep / '1' / 'train.log'}`" in unfinished
    missing = text.split("## Missing runs (1)")[1]
    assert f"`{sweep}` job 3: `regularizer=adaptive_l2" in missing and " seed=1 " in missing
    with (sweep / "report.csv").open() as file:
        assert [(row["method"], row["n"]) for row in csv.DictReader(file)] == [
            ("none", "1"),
            ("adaptive_l2", "1"),
        ]


@pytest.mark.slow  # ~35 s of CPU: the launcher and the job each import torch and Lightning
def test_submitit_local_launcher_runs_a_study_job(tmp_path_factory, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_study(
        sweep_dir,
        tmp_path_factory.getbasetemp() / "data",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "regularizer=none",
        "seed=0",
    )
    assert (sweep_dir / ".submitit").is_dir()
    metrics = json.loads((sweep_dir / "0" / "test_metrics.json").read_text())
    text, _ = report([sweep_dir], plots=False)
    assert f"| none | synthetic | 1/1 | {100 * metrics['test/mAP']:.2f} | baseline |" in text


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="optional extra: pip install -e '.[optuna]'")
def test_optuna_search_runs_and_its_trials_are_reported(tmp_path_factory, tmp_path):
    sweep_dir = tmp_path / "sweep"
    data_dir = tmp_path_factory.getbasetemp() / "data"
    run_study(
        sweep_dir, data_dir, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", study="l2_search_constant"
    )
    text, _ = report([sweep_dir], plots=False)
    for job in ("0", "1"):
        lam = yaml.safe_load((sweep_dir / job / "config.yaml").read_text())["regularizer"]["constant_l2"][
            "lam"
        ]
        assert f"constant_l2 constant_l2.lam={lam}" in text
    assert "## Missing runs" not in text
