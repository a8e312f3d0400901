"""``python -m reidreg.dashboard <multirun dir | run dirs...> [--dry-run] [--out DIR] [--entity E]
[--project P]``: a study as a W&B Report comparing its methods, and the same dashboard offline.

The study is gathered and compared once, by ``reidreg.report.compare`` (every option of ``reidreg.report``
applies: ``--baseline``, ``--alpha``, ``--sequential``, ...), and written into ``--out`` (default: the
directory given, or the common parent of several):

- ``report.md``, ``report.csv`` and the report's figures, as ``python -m reidreg.report`` writes them;
- ``dashboard.html``: one self-contained page (``reidreg.reporting.dashboard_html``) with, per dataset,
  test mAP / R1 / mINP by method, the paired Δ mAP with its CI against the baseline, validation mAP over
  epochs, adaptive L2's median λ per category, and the cost; it needs no network to open;
- ``wandb_report.json``: the specification of the W&B Report with the same panels
  (``reidreg.reporting.wandb_report``), whose runsets select the study's runs by their W&B groups.

With W&B credentials (``WANDB_API_KEY`` or ``wandb login``), ``WANDB_MODE`` not ``offline``/``disabled``
and no ``--dry-run``, the Report is also saved to W&B (``--entity``/``--project``, else the runs' own, else
the ``logger/wandb`` config's project and the account's default entity) and its URL printed. Otherwise the
command says in one line that it wrote the specification only: it never prompts and never waits on the
network.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

from omegaconf import OmegaConf

from reidreg.errors import ConfigError
from reidreg.report import (
    Comparison,
    add_comparison_arguments,
    check_comparison_arguments,
    compare,
    write_report,
)

DASHBOARD_FILE = "dashboard.html"
SPEC_FILE = "wandb_report.json"
SAVE_TIMEOUT_S = 60.0
OFFLINE_MODES = ("offline", "disabled", "dryrun")
MISSING_LIBRARY = "the W&B Report needs wandb-workspaces: pip install -e '.[dashboard]'"


def default_project() -> str:
    """The project of the ``logger/wandb`` config, where reidreg.train logs runs unless told otherwise."""
    from reidreg.options.check import CONF_DIR

    return str(OmegaConf.load(CONF_DIR / "logger" / "wandb.yaml").wandb.project)


def wandb_destination(comparison: Comparison, entity: str | None, project: str | None) -> tuple[str, str]:
    """``(entity, project)``: the options given, else those the runs logged to; entity "" if unknown."""
    logged = [(run.config.get("logger") or {}).get("wandb") or {} for run in comparison.study.runs]

    def first(key: str) -> str | None:
        return next((str(node[key]) for node in logged if node.get(key)), None)

    return entity or first("entity") or "", project or first("project") or default_project()


def why_not_saved(dry_run: bool) -> str | None:
    """Why the Report is not saved to W&B now (None: it is): never ask, never wait on the network."""
    if dry_run:
        return "--dry-run"
    mode = os.environ.get("WANDB_MODE", "")
    if mode in OFFLINE_MODES:
        return f"WANDB_MODE={mode}"
    from reidreg.utils.loggers import wandb_has_credentials  # imports Lightning: not for --help

    if not wandb_has_credentials():
        return "no W&B credentials: WANDB_API_KEY or `wandb login`"
    return None


def save_report(report: Any, timeout_s: float = SAVE_TIMEOUT_S) -> str:
    """Save the Report to W&B and return its URL; ``TimeoutError`` after ``timeout_s``."""
    from reidreg.reporting import wandb_report

    result: dict[str, Any] = {}

    def save() -> None:
        try:
            if not report.entity:  # the account's own entity: asked of W&B only when saving
                import wandb

                report.entity = wandb.Api(timeout=int(timeout_s)).default_entity
            wandb_report.name_runsets(report)
            report.save()
            result["url"] = report.url
        except Exception as error:  # network, permissions: reported in one line by the caller
            result["error"] = error

    # A daemon thread: an unreachable server cannot keep the command waiting past timeout_s.
    thread = threading.Thread(target=save, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"W&B did not answer within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["url"]


def study_title(comparison: Comparison) -> str:
    datasets = list(dict.fromkeys(row.dataset for row in comparison.rows))
    methods = len({row.method for row in comparison.rows})
    return f"reidreg: {methods} methods on {', '.join(datasets)} ({comparison.common_dir.name})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reidreg.dashboard", description=__doc__.split("\n\n")[0])
    add_comparison_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"write the Report's specification ({SPEC_FILE}), do not save it",
    )
    parser.add_argument("--entity", default=None, help="W&B entity of the Report (default: the runs')")
    parser.add_argument("--project", default=None, help="W&B project of the Report (default: the runs')")
    args = parser.parse_args(argv)
    options = check_comparison_arguments(parser, args)
    try:
        from reidreg.reporting import wandb_report
    except ImportError:
        print(f"error: {MISSING_LIBRARY}", file=sys.stderr)
        return 2
    try:
        comparison = compare(args.paths, **options)
    except (FileNotFoundError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from reidreg.reporting.dashboard_html import write_dashboard  # matplotlib only once there is work

    out_dir = args.out or comparison.common_dir
    title = study_title(comparison)
    written = write_report(comparison, out_dir)
    written.append(write_dashboard(comparison.rows, out_dir / DASHBOARD_FILE, title=title))
    entity, project = wandb_destination(comparison, args.entity, args.project)
    description = "By python -m reidreg.dashboard from " + ", ".join(str(p) for p in args.paths)
    report = wandb_report.build_report(
        comparison.rows, title=title, entity=entity, project=project, description=description
    )
    spec = wandb_report.write_spec(report, out_dir / SPEC_FILE)
    written.append(spec)
    print("Written: " + ", ".join(str(path) for path in written))
    reason = why_not_saved(args.dry_run)
    if reason is not None:
        print(f"W&B Report not saved ({reason}): its specification is in {spec}")
        return 0
    try:
        url = save_report(report)
    except Exception as error:
        print(
            f"error: W&B Report not saved ({type(error).__name__}: {error}); its specification is in {spec}"
        )
        return 1
    print(f"W&B Report: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
