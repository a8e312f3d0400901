"""Command-line glue: user errors become one clear line (no traceback); metric tables are printed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from reidreg.errors import ReIDRegError


def run_cli(task: Callable[[Any], Any], cfg: Any) -> Any:
    """Run ``task(cfg)``; bad input is reported as ``error: <message>`` with exit status 2."""
    try:
        return task(cfg)
    except (ReIDRegError, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def print_metrics_table(title: str, metrics: Mapping[str, float], keys: Iterable[str]) -> None:
    """A small aligned table of ``<split>/<key>`` metrics, as percentages."""
    values = {key: value for name, value in metrics.items() for key in keys if name.endswith(f"/{key}")}
    print(f"\n{title}")
    print("  " + "  ".join(f"{key:>7s}" for key in values))
    print("  " + "  ".join(f"{100 * value:7.2f}" for value in values.values()))
