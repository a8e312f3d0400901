"""The last lines of a run: where each of its files is, and how to upload a W&B run that ran offline.

A newcomer should not have to know the run directory's layout (``reidreg.run_dir``) to find the log, the
metrics or the checkpoints: the run lists what it wrote, and only what exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from pytorch_lightning.loggers import Logger, WandbLogger

from reidreg.run_dir import RunDir

log = logging.getLogger(__name__)


def run_files(run_dir: Path) -> list[tuple[str, Path]]:
    """(what, path) of every file or folder of the run directory that exists, in reading order."""
    layout = RunDir(run_dir)
    files = [
        ("log", layout.log),
        ("run status", layout.run_json),
        ("resolved config", layout.config),
        ("CSV metrics", layout.csv_metrics),
        ("checkpoints", layout.checkpoints),
        ("test metrics", layout.test_metrics),
        ("per-query test", layout.per_query),
    ]
    return [(name, path) for name, path in files if path.exists()]


def wandb_runs(loggers: Iterable[Logger]) -> list[tuple[Path, bool]]:
    """(local folder, ran offline) of each W&B run of ``loggers`` (a disabled W&B run has none)."""
    runs = []
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False):
            runs.append((Path(logger.experiment.sync_dir), bool(logger.experiment.offline)))
    return runs


def log_run_summary(run_dir: Path, loggers: Iterable[Logger]) -> None:
    """One log record: the run directory, its files, and each W&B folder (with ``wandb sync`` if offline)."""
    lines = [f"\n  {name:16s} {path}" for name, path in run_files(run_dir)]
    for folder, offline in wandb_runs(loggers):
        lines.append(f"\n  {'W&B run':16s} {folder}")
        if offline:
            lines.append(f"\n  {'upload it with':16s} wandb sync {folder}")
    log.info("Run directory: %s%s", run_dir.resolve(), "".join(lines))
