"""Command-line glue: user errors become one clear line (no traceback); metric tables are printed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from reidreg.errors import ReIDRegError

log = logging.getLogger(__name__)


def run_cli(task: Callable[[Any], Any], cfg: Any) -> Any:
    """Run ``task(cfg)``; bad input is reported as ``error: <message>`` with exit status 2.

    In a multirun the error is logged (into the job's log, which ``reidreg.report`` shows) and re-raised,
    so that Hydra marks this job failed and goes on with the others.
    """
    try:
        return task(cfg)
    except (ReIDRegError, OmegaConfBaseException) as error:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("error: %s", error)
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def print_metrics_table(title: str, metrics: Mapping[str, float], keys: Iterable[str]) -> None:
    """A small aligned table of ``<split>/<key>`` metrics, as percentages."""
    values = {key: value for key in keys for name, value in metrics.items() if name.endswith(f"/{key}")}
    print(f"\n{title}")
    print("  " + "  ".join(f"{key:>7s}" for key in values))
    print("  " + "  ".join(f"{100 * value:7.2f}" for value in values.values()))
