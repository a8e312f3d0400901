"""Loggers from the ``logger`` config group; W&B is made safe to run anywhere.

W&B must never prompt or hang: unless the user chose a mode (``WANDB_MODE``) it runs online only when
credentials are configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc) and offline
otherwise; offline runs can be uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

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


def build_loggers(cfg: DictConfig) -> list[Logger]:
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
        loggers.append(logger)
    return loggers
