"""Command-line glue: user errors become one clear line (no traceback); metric tables are printed.

Only Hydra, OmegaConf and the standard library are imported here: the CLI entry modules import this
before the config is composed.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from reidreg.errors import ReIDRegError, message_of
from reidreg.run_dir import LOCK_FILE
from reidreg.utils.console import FILE_ONLY_LOGGER

log = logging.getLogger(__name__)


def run_cli(task: Callable[..., Any], cfg: Any, **kwargs: Any) -> Any:
    """Run ``task(cfg, **kwargs)``; bad input is reported as ``error: <message>``, exit status 2.

    Errors that end a run for a known reason (a divergence, a signal) exit with their own status (3, 4).
    In a multirun the error is logged (into the job's log, which ``reidreg.report`` shows) and re-raised,
    so that Hydra marks this job failed and goes on with the others. A single run that failed before
    writing anything leaves no run directory behind (only Hydra's own files were in it).
    """
    try:
        return task(cfg, **kwargs)
    except (ReIDRegError, OmegaConfBaseException) as error:
        message = message_of(error)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("error: %s", message)
            raise
        logging.getLogger(FILE_ONLY_LOGGER).error("error: %s", message)  # the run's log file keeps it too
        print(f"error: {message}", file=sys.stderr)
        remove_unused_run_dir()
        sys.exit(getattr(error, "exit_code", 2))


def remove_unused_run_dir() -> None:
    """Delete Hydra's run directory if it holds nothing but Hydra's own files (``.hydra/``, the job log)
    and the lock of a run that never began."""
    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log", LOCK_FILE}
    if run_dir.is_dir() and {path.name for path in run_dir.iterdir()} <= hydra_files:
        shutil.rmtree(run_dir, ignore_errors=True)


def continue_logging_in(run_dir: Path) -> None:
    """A resumed run continues in its original directory: its job log there gets this session's lines.

    Hydra made a fresh directory for this invocation; its log handler is moved to ``run_dir`` (appending)
    and the fresh directory, which then holds only Hydra's files, is removed, so that the run stays one
    directory (as ``reidreg.report`` counts runs).
    """
    if not HydraConfig.initialized():
        return
    fresh = Path(HydraConfig.get().runtime.output_dir).resolve()
    if fresh == run_dir.resolve():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
            moved = logging.FileHandler(run_dir / Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
    log.info("Resuming in the run's own directory %s", run_dir)
    remove_unused_run_dir()


def print_metrics_table(title: str, metrics: Mapping[str, float], keys: Iterable[str]) -> None:
    """A small aligned table of ``<split>/<key>`` metrics, as percentages (logged: console and log file)."""
    values = {key: value for key in keys for name, value in metrics.items() if name.endswith(f"/{key}")}
    header = "  ".join(f"{key:>7s}" for key in values)
    row = "  ".join(f"{100 * value:7.2f}" for value in values.values())
    log.info("%s\n  %s\n  %s", title, header, row)
