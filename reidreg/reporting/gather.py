"""Find the runs of a study on disk: the finished ones, the unfinished or failed ones, the missing ones.

A run directory is what ``reidreg.train`` writes: ``config.yaml`` (the resolved config), ``csv/metrics.csv``,
``run.json`` (status, reason, provenance and performance, kept up to date while the run goes) and, once
tested, ``test_metrics.json``. When Hydra launched the run it also holds ``.hydra/`` (the job's
``overrides.yaml``; ``hydra.yaml`` with the job number and the chosen config-group options, among them
``experiment``) and the job log ``<job name>.log``. A Hydra multirun directory holds one run directory
per job; the basic sweeper also leaves ``multirun.yaml`` there, from which the jobs the sweep was meant
to run are rebuilt exactly as Hydra built them (sweeps that set ``n_trials``, such as Optuna's, give a
count of jobs instead). Jobs without a directory are reported as missing, never silently dropped.

A run is *finished* — averaged in the report — only when it has test metrics and its ``run.json`` says
``finished``: a failed, diverged or interrupted run never is, even with a ``test_metrics.json`` next to
it. Runs made before ``run.json`` existed have none: they count as finished when tested, and their
status, environment and cost are unknown.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from reidreg.run_dir import CONFIG_FILE, CSV_METRICS, RUN_FILE, TEST_METRICS_FILE
from reidreg.utils.config import regularizer_name

FINISHED = "finished"
HYDRA_DIR = ".hydra"
MULTIRUN_FILE = "multirun.yaml"


@dataclass
class Run:
    """One run directory and what it says about itself."""

    run_dir: Path
    config: dict[str, Any]  # resolved config.yaml; Hydra's unresolved .hydra/config.yaml if that is missing
    metrics: dict[str, float] | None  # test_metrics.json; None when the run has not written it
    info: dict[str, Any] | None = None  # run.json; None for a run made before reidreg wrote it
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides (.hydra)
    choices: dict[str, Any] = field(default_factory=dict)  # chosen option of every config group (.hydra)
    job_num: int | None = None  # position of the job in its multirun
    job_name: str | None = None  # Hydra's job name; the job log is <run_dir>/<job_name>.log
    launch: list[str] = field(default_factory=list)  # --config-dir/--config-name it was launched with

    @property
    def status(self) -> str | None:
        """run.json's status (running, finished, failed, diverged, interrupted); None without run.json."""
        if self.info is None:
            return None
        return str(self.info.get("status") or "unknown")

    @property
    def reason(self) -> str | None:
        return None if self.info is None else self.info.get("reason")

    @property
    def finished(self) -> bool:
        """Tested and, if it has a run.json, recorded as finished: the runs that are averaged."""
        return self.metrics is not None and self.status in (None, FINISHED)

    @property
    def provenance(self) -> dict[str, Any]:
        """run.json's provenance ({} without it): see ``reidreg.provenance``."""
        return dict((self.info or {}).get("provenance") or {})

    @property
    def performance(self) -> dict[str, Any]:
        """run.json's performance ({} without it): train_img_per_s, train_ms_per_step, peak_memory_mib."""
        return dict((self.info or {}).get("performance") or {})

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def dataset(self) -> str:
        return str((self.config.get("dataset") or {}).get("name", "?"))

    @property
    def regularizer(self) -> str:
        return regularizer_name(self.config.get("regularizer"))

    @property
    def experiment(self) -> str | None:
        return self.choices.get("experiment")

    @property
    def log_file(self) -> Path | None:
        path = self.run_dir / f"{self.job_name}.log"
        return path if self.job_name and path.is_file() else None

    def last_epoch(self) -> int | None:
        """The last training epoch in ``csv/metrics.csv`` (0-based), None without it."""
        path = self.run_dir / CSV_METRICS
        if not path.is_file():
            return None
        with path.open(newline="") as file:
            epochs = [int(float(row["epoch"])) for row in csv.DictReader(file) if row.get("epoch")]
        return max(epochs) if epochs else None


@dataclass
class MissingJob:
    """A job a multirun was meant to run that has no run directory."""

    sweep_dir: Path
    job_num: int
    overrides: list[str]  # empty when the sweeper picks them itself (Optuna)


@dataclass
class Study:
    runs: list[Run]
    missing: list[MissingJob]
    notes: list[str]

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.finished]

    @property
    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if not run.finished]


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (CONFIG_FILE, TEST_METRICS_FILE, RUN_FILE, HYDRA_DIR))


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else every run directory below it (not below a run)."""
    if is_run_dir(path):
        return [path]
    found = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += find_run_dirs(child)
    return found


def _load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as plain containers, interpolations left as written ({} if there is no file)."""
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def load_run_info(path: Path) -> dict[str, Any] | None:
    """run.json as a dict; None without the file; an ``unreadable`` status if it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {"status": "unreadable", "reason": f"{path.name} is not valid JSON ({error})"}
    if not isinstance(info, dict):
        return {"status": "unreadable", "reason": f"{path.name} holds a {type(info).__name__}, not an object"}
    return info


def load_run(run_dir: Path) -> Run:
    config = _load_yaml(run_dir / CONFIG_FILE) or _load_yaml(run_dir / HYDRA_DIR / "config.yaml")
    metrics_path = run_dir / TEST_METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    hydra = _load_yaml(run_dir / HYDRA_DIR / "hydra.yaml").get("hydra", {})
    job = hydra.get("job", {})
    num = job.get("num")
    return Run(
        run_dir=run_dir,
        config=config,
        metrics=metrics,
        info=load_run_info(run_dir / RUN_FILE),
        overrides=[str(o) for o in _load_overrides(run_dir / HYDRA_DIR / "overrides.yaml")],
        choices=dict(hydra.get("runtime", {}).get("choices", {})),
        job_num=num if isinstance(num, int) and hydra.get("mode") == "MULTIRUN" else None,
        job_name=job.get("name"),
        launch=_launch_options(hydra),
    )


def _launch_options(hydra: dict[str, Any]) -> list[str]:
    """``--config-dir D --config-name N`` of a job started from a study file (``sweeps/``), else []."""
    name = (hydra.get("job") or {}).get("config_name")
    if not name or name == "train":
        return []
    sources = (hydra.get("runtime") or {}).get("config_sources") or []
    dirs = [
        str(s.get("path", "")).removeprefix("file://") for s in sources if s.get("provider") == "command-line"
    ]
    return [*(["--config-dir", dirs[0]] if dirs else []), "--config-name", str(name)]


def _load_overrides(path: Path) -> list[Any]:
    return list(OmegaConf.load(path)) if path.is_file() else []


def expected_jobs(sweep_config: dict[str, Any]) -> list[list[str]] | None:
    """The override list of every job of a multirun, in job-number order; None if it cannot be known.

    ``sweep_config`` is the ``hydra`` node of ``multirun.yaml`` or of a job's ``.hydra/hydra.yaml``. For
    the basic sweeper the jobs are rebuilt with its own code (sweep params first, then the command line,
    whose values win); a sweeper with ``n_trials`` runs that many jobs with overrides of its choosing.
    """
    sweeper = sweep_config.get("sweeper", {})
    if str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        # Hydra's own parser and product, so the job numbers match the directories Hydra made.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
        task = list(sweep_config.get("overrides", {}).get("task", []))
        overrides = OverridesParser.create().parse_overrides(params + task)
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    if isinstance(sweeper.get("n_trials"), int):
        return [[] for _ in range(sweeper["n_trials"])]
    return None


def _sweep_dir_of(run: Run) -> Path | None:
    """The multirun directory a job belongs to: the nearest parent with multirun.yaml, else its parent."""
    if run.job_num is None:
        return None
    for parent in run.run_dir.parents:
        if (parent / MULTIRUN_FILE).is_file():
            return parent
    return run.run_dir.parent


def find_missing_jobs(runs: list[Run], sweep_dirs: list[Path]) -> tuple[list[MissingJob], list[str]]:
    """Jobs of the multiruns in ``sweep_dirs`` that have no run directory, and notes on unknown sweeps."""
    missing, notes = [], []
    for sweep_dir in sweep_dirs:
        jobs_here = [run for run in runs if _sweep_dir_of(run) == sweep_dir]
        if (sweep_dir / MULTIRUN_FILE).is_file():
            sweep_config = _load_yaml(sweep_dir / MULTIRUN_FILE).get("hydra", {})
        elif jobs_here:
            sweep_config = _load_yaml(jobs_here[0].run_dir / HYDRA_DIR / "hydra.yaml").get("hydra", {})
        else:
            continue
        expected = expected_jobs(sweep_config)
        if expected is None:
            notes.append(f"{sweep_dir}: cannot tell which jobs this sweep was meant to run; only those found")
            continue
        present = {run.job_num for run in jobs_here}
        missing += [
            MissingJob(sweep_dir, num, overrides)
            for num, overrides in enumerate(expected)
            if num not in present
        ]
    return missing, notes


def gather(paths: list[Path]) -> Study:
    """Every run under ``paths`` (run or multirun directories) and every job their multiruns lack."""
    paths = [Path(p).resolve() for p in paths]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
    run_dirs = list(dict.fromkeys(d for path in paths for d in find_run_dirs(path)))
    # Job-number order inside each multirun (directory names sort "10" before "2").
    runs = sorted(
        (load_run(d) for d in run_dirs),
        key=lambda run: (
            str(run.run_dir.parent),
            -1 if run.job_num is None else run.job_num,
            run.run_dir.name,
        ),
    )
    # Only sweeps that were asked for as a whole: a run directory named alone does not imply its siblings.
    sweep_dirs = {_sweep_dir_of(run) for run in runs} - {None}
    sweep_dirs |= {p.parent for path in paths for p in path.rglob(MULTIRUN_FILE)}
    asked = [d for d in sorted(sweep_dirs) if any(d == p or p in d.parents for p in paths)]
    missing, notes = find_missing_jobs(runs, asked)
    return Study(runs=runs, missing=missing, notes=notes)
