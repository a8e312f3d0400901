"""Loggers from the ``logger`` config group; W&B is made safe to run anywhere; CSV history survives resume.

W&B must never prompt or hang: unless the user chose a mode (``WANDB_MODE``) it runs online only when
credentials are configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc) and offline
otherwise; offline runs can be uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.

W&B runs are grouped by method, as the report groups them: unless ``logger.wandb.group`` is set, the group
is ``<dataset>/<regularizer>/<method hash>``, where the hash covers every option that changes the
experiment (``reidreg.experiment``: λ and the other hyper-parameters included; the seed, everything set
from it and the operational options left out), so the seeds of one method share a group and another λ or
dataset does not. Each run is tagged ``seed:<n>`` and ``preset:<experiment preset>`` (Hydra's choice,
``none`` without one) and, when it ends, ``status:<finished|failed|diverged|interrupted>``, which its
summary's ``status`` repeats (``finish_wandb``).

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
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from reidreg.experiment import method_hash, method_settings
from reidreg.provenance import provenance_for_wandb
from reidreg.utils.config import flatten, instantiate, regularizer_name

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


def experiment_preset() -> str:
    """The ``experiment`` preset Hydra composed the run with; ``none`` without one or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "none"
    return str(HydraConfig.get().runtime.choices.get("experiment") or "none")


def method_group(cfg: DictConfig) -> tuple[str, str]:
    """``(<dataset>/<regularizer>/<hash[:10]>, full hash)``: the W&B group of the run's method."""
    resolved = flatten(OmegaConf.to_container(cfg, resolve=True))
    seed_derived = {
        key
        for key, value in flatten(OmegaConf.to_container(cfg, resolve=False)).items()
        if isinstance(value, str) and "${seed}" in value
    }
    digest = method_hash(method_settings(resolved, seed_derived))
    return f"{cfg.dataset.name}/{regularizer_name(cfg.get('regularizer'))}/{digest[:10]}", digest


def wandb_group(cfg: DictConfig) -> str:
    """The run's W&B group: ``logger.wandb.group`` if set, else its method's (``method_group``).

    Recorded in run.json for every run, with W&B or not, so that a dashboard selects the study's runs.
    """
    chosen = ((cfg.get("logger") or {}).get("wandb") or {}).get("group")
    return str(chosen) if chosen else method_group(cfg)[0]


def _wandb_logger(cfg: DictConfig, logger_cfg: DictConfig) -> WandbLogger:
    mode = wandb_mode()
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    log.info("W&B logging %s", mode)
    _, digest = method_group(cfg)
    preset = experiment_preset()
    tags = [*(logger_cfg.get("tags") or []), f"seed:{cfg.seed}", f"preset:{preset}"]
    logger = instantiate(logger_cfg, offline=mode != "online", group=wandb_group(cfg), tags=tags)
    # Lightning passes anonymous=None, which W&B >= 0.19 answers with "The anonymous setting has no
    # effect"; leaving the argument out is the same request.
    logger._wandb_init.pop("anonymous", None)
    logger.log_hyperparams(
        {**OmegaConf.to_container(cfg, resolve=True), "preset": preset, "method_sha256": digest}
    )
    return logger


def finish_wandb(loggers: list[Logger], status: str, performance: dict[str, Any] | None = None) -> None:
    """Mark the W&B run with how the run ended (tag ``status:<status>``, summary ``status`` and the cost)
    and finish it, so that the next job of an in-process multirun starts a run of its own."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        try:
            run = logger.experiment
            run.tags = (*run.tags, f"status:{status}")
            run.summary.update({"status": status, **provenance_for_wandb({}, performance)})
            run.finish(exit_code=0 if status == "finished" else 1)
        except Exception as error:  # W&B may be what failed: never hide the run's own error behind it
            log.warning("W&B: could not record the run's final status %s (%s)", status, error)


def build_loggers(cfg: DictConfig, *, resume_step: int | None = None) -> list[Logger]:
    """The configured loggers; ``resume_step``: the global step of the checkpoint a resumed run continues."""
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        logger = _wandb_logger(cfg, logger_cfg) if name == "wandb" else instantiate(logger_cfg)
        if isinstance(logger, CSVLogger):
            logger.resume_step = resume_step
        loggers.append(logger)
    return loggers
