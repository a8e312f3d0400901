"""Loggers from the ``logger`` config group; W&B is made safe to run anywhere; CSV history survives resume.

W&B must never prompt or hang: unless the user chose a mode (``WANDB_MODE``) it runs online only when
credentials are configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc) and offline
otherwise; offline runs can be uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.

``CSVLogger`` is Lightning's, except that a resumed run keeps the history: Lightning's writer deletes an
existing ``metrics.csv``; ours keeps its rows up to the checkpoint's step (rows written after the
checkpoint by the interrupted process are dropped, since the resumed run logs those steps again).
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers import Logger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from reidreg.utils.config import instantiate

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entries = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return entries.authenticators(host) is not None


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else online with credentials and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows of an existing ``metrics.csv`` before ``first_step``."""

    def __init__(self, log_dir: str, first_step: int) -> None:
        self.first_step = first_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self.first_step]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # later rows are appended under this header (widened if new keys come)


class CSVLogger(LightningCSVLogger):
    """``metrics.csv`` in ``<save_dir>/<name>/``; with ``resume_step`` set, the earlier rows are kept."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume_step)
        return LightningCSVLogger.experiment.fget(self)


def build_loggers(cfg: DictConfig, *, resume_step: int | None = None) -> list[Logger]:
    """The configured loggers; ``resume_step``: the global step of the checkpoint a resumed run continues."""
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            mode = wandb_mode()
            os.environ["WANDB_MODE"] = mode
            os.environ.setdefault("WANDB_SILENT", "true")
            log.info("W&B logging %s", mode)
            logger = instantiate(logger_cfg, offline=mode != "online")
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        else:
            logger = instantiate(logger_cfg)
        if isinstance(logger, CSVLogger):
            logger.resume_step = resume_step
        loggers.append(logger)
    return loggers
