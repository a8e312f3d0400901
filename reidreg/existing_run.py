"""A training command started in a directory that already holds a run.

* A live run holds the directory (``reidreg.run_dir.RunLock``): the command is refused, naming it.
* A finished run that the command would not extend (same ``trainer.max_epochs``/``max_steps``/``max_time``)
  is left as it is: the command says so and ends with status 0, so that relaunching a whole multirun into
  its sweep folder completes only the jobs that are missing or were interrupted.
* Otherwise the command continues the run only if it asks for the same experiment (``reidreg.training.resume``
  decides which options may differ); another experiment is refused.

``check_before_start`` runs in the Hydra callback, before Hydra writes anything into the directory; the
training entry point repeats the checks once it holds the lock (a multirun job, or ``train(cfg)`` from
Python, has no earlier chance). Imports only OmegaConf and the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reidreg.errors import ConfigError
from reidreg.run_dir import RunDir, in_use_message, lock_holder

#: Options that lengthen a run: a finished run asked for more of them continues training.
EXTENDING = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``run.json`` (empty when there is none or it cannot be read)."""
    try:
        return json.loads(RunDir(run_dir).run_json.read_text())
    except (OSError, ValueError):
        return {}


def finished_results(run_dir: str | Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The test results of a finished run in ``run_dir`` that ``cfg`` would not extend, else ``None``."""
    layout = RunDir(run_dir)
    if read_status(run_dir).get("status") != "finished" or not layout.config.is_file():
        return None
    stored = OmegaConf.load(layout.config)
    if any(OmegaConf.select(stored, key) != OmegaConf.select(cfg, key) for key in EXTENDING):
        return None
    if not layout.test_metrics.is_file():
        return {}
    results = json.loads(layout.test_metrics.read_text())
    return {key: value for key, value in results.items() if isinstance(value, int | float)}


def finished_message(run_dir: str | Path, results: dict[str, Any]) -> str:
    score = f" (test mAP {100 * results['test/mAP']:.2f} %)" if "test/mAP" in results else ""
    return (
        f"the run in {run_dir} is finished{score}: nothing to do. To train it longer raise "
        "trainer.max_epochs; for a new run give it its own directory (hydra.run.dir)."
    )


def check_same_experiment(run_dir: str | Path, cfg: DictConfig) -> None:
    """Refuse ``cfg`` in a directory whose run (``config.yaml``) is another experiment."""
    from reidreg.training.resume import resumed_config

    layout = RunDir(run_dir)
    if not layout.config.is_file():
        return
    stored = OmegaConf.to_container(OmegaConf.load(layout.config), resolve=True)
    try:
        resumed_config(cfg, stored, overrides=None)
    except ConfigError as error:
        raise ConfigError(
            f"the run directory {run_dir} already holds a run of another experiment ({error}); "
            "give this run its own directory (hydra.run.dir)"
        ) from None


def check_before_start(run_dir: str | Path, cfg: DictConfig) -> str | None:
    """Before any write: ``ConfigError`` if the directory is in use or holds another experiment; the
    message to print if it holds this finished run; ``None`` to go ahead."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise ConfigError(in_use_message(run_dir, holder))
    if not RunDir(run_dir).config.is_file():
        return None
    check_same_experiment(run_dir, cfg)
    results = finished_results(run_dir, cfg)
    return None if results is None else finished_message(run_dir, results)
