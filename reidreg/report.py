"""``python -m reidreg.report <multirun dir | run dirs...> [--out DIR] [--baseline METHOD]``: compare methods.

Gathers every run below the given directories (``reidreg.reporting.gather``), names the method of each
(``reidreg.reporting.methods``), and writes into ``--out`` (default: the directory given, or the common
parent of several):

- ``report.md`` and ``report.csv``: method × dataset, every run launched and how it ended, mAP (primary)
  and R1 / mINP (secondary) as mean ± std over seeds, the difference to the baseline over the seeds both
  have (paired t and sign-flip tests, Holm-corrected; ``reidreg.reporting.stats``), a two-level
  bootstrap over seeds and test identities from the runs' per-query results (deterministic for
  ``--seed``; ``reidreg.reporting.bootstrap``), and the cost (``reidreg.reporting.table``); the notes
  say how many paired seeds each comparison would need (``--power``; ``reidreg.reporting.power``) and,
  with ``--sequential``, whether a Pocock rule says stop or continue (``reidreg.reporting.sequential``);
  ``--plan`` adds the seeds to run and their command (``reidreg.reporting.plan``);
- ``map.png`` and, for adaptive L2, ``lambda_median_<method>_<dataset>.png`` (``reidreg.reporting.plots``).

The Markdown report is also printed. Runs that did not finish (failed, diverged or interrupted according to
their ``run.json``, or without ``test_metrics.json``) are counted in their method's row, listed with their
logs and never averaged; jobs of a multirun that never started are listed too; so are differences between
methods other than the method itself. The table shows each method's training speed and peak memory
(``run.json``), and the report warns when the runs compared differ in their environment (software, code
version, numerics; ``reidreg.reporting.environment``). Runs of one dataset that differ in its content, in
precision or in device class are refused, in one message naming the runs and the field, unless ``--allow-
mixed`` is given (the report then says so above the table).

``compare`` gathers and compares a study without writing anything; ``write_report`` writes it. The
dashboard (``reidreg.dashboard``) shows the same ``Comparison`` and takes the same options
(``add_comparison_arguments``, ``check_comparison_arguments``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidreg.errors import ConfigError
from reidreg.reporting.bootstrap import DEFAULT_SAMPLES
from reidreg.reporting.environment import (
    environment_differences,
    mixed_runs,
    mixing_refusal,
    shared_environment,
    without_provenance,
)
from reidreg.reporting.gather import FINISHED, Run, Study, gather
from reidreg.reporting.methods import comparability_notes, method_labels
from reidreg.reporting.plan import plan_section
from reidreg.reporting.power import DEFAULT_POWER
from reidreg.reporting.sequential import DEFAULT_MAX_PAIRS, DEFAULT_MIN_PAIRS, MAX_LOOKS, SequentialDesign
from reidreg.reporting.table import Row, build_rows
from reidreg.reporting.table_text import legend, markdown_table, write_csv
from reidreg.run_dir import RunDir


def _last_error_line(log_file: Path) -> str | None:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line or "Traceback" in line]
    return errors[-1] if errors else None


def run_status(run: Run) -> str:
    """Why a run is not averaged: its run.json status and reason, or what its files say."""
    untested = run.config.get("test") is False
    if run.status is None:  # made before run.json existed
        if untested:
            return "not tested (test=false)"
        return "no test_metrics.json: failed, stopped or still running (no run.json: status unknown)"
    if run.status == FINISHED:
        return "finished, not tested (test=false)" if untested else "finished, but no test_metrics.json"
    text = f"**{run.status}**" + (f": {run.reason}" if run.reason else "")
    if run.status == "running":
        text += " (still running, or killed before it could record how it ended)"
    if run.metrics is not None:
        text += "; its test_metrics.json is ignored"
    return text


def describe_unfinished(run: Run) -> str:
    """One list item: which run, what was asked of it, how far it got, where its logs are."""
    item = [f"- `{run.run_dir}`: {run.regularizer} on {run.dataset}, seed {run.seed}: {run_status(run)}"]
    if run.overrides:
        item.append(f"  overrides: `{' '.join(run.overrides)}`")
    epoch = run.last_epoch()
    max_epochs = (run.config.get("trainer") or {}).get("max_epochs")
    item.append(
        "  no epoch logged in csv/metrics.csv"
        if epoch is None
        else f"  last epoch logged: {epoch + 1} of {max_epochs}"
    )
    if run.log_file is not None:
        error = _last_error_line(run.log_file)
        item.append(
            f"  job log `{run.log_file}`" + (f", last error: `{error}`" if error else ", no error in it")
        )
    last = RunDir(run.run_dir).last
    if run.status in ("interrupted", "running") and last.is_file():
        item.append(f"  resume with `ckpt_path={last}`")
    submitit = run.run_dir.parent / ".submitit"
    if submitit.is_dir():
        item.append(f"  submitit job logs (stdout/stderr of the job) in `{submitit}`")
    return "\n".join(item)


def _status_counts(runs: list[Run]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        status = run.status or "status unknown"
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} {status}" for status, count in counts.items())


def render(
    study: Study,
    rows: list[Row],
    notes: list[str],
    *,
    paths: list[Path],
    alpha: float,
    describe: Callable[[Run], str],
    mixed: list[str] | None = None,
) -> str:
    sections = [
        f"# Comparison of {len(study.finished)} finished runs ({len(study.runs)} launched)\n",
        "Runs gathered from " + ", ".join(f"`{path}`" for path in paths) + ".\n",
    ]
    if mixed:
        sections.append(
            "**Mixed comparison (--allow-mixed): these runs measured different things.** Differences in "
            "the table may come from these rather than from the methods:\n"
        )
        sections += [f"- {line}" for line in mixed]
        sections.append("")
    differences = environment_differences(study.finished, describe)
    if differences:
        sections.append(
            "**Warning: the runs compared differ in their environment.** A run is reproducible only within "
            "one environment, and such a difference alone can shift the metrics by as much as the methods "
            "differ:\n"
        )
        sections += [f"- {difference}" for difference in differences]
        sections.append("")
    sections.append(markdown_table(rows) if rows else "No finished run (no test_metrics.json) was found.")
    sections.append("\n" + legend(alpha))
    environment = shared_environment(study.finished)
    if environment:
        sections.append(f"\nShared by every run compared that has a run.json: {environment}.")
    if study.unfinished:
        sections.append(
            f"\n## Unfinished or failed runs ({len(study.unfinished)}), counted in the table, never averaged"
            f" ({_status_counts(study.unfinished)})\n"
        )
        sections += [describe_unfinished(run) for run in study.unfinished]
    if study.missing:
        sections.append(f"\n## Missing runs ({len(study.missing)}): jobs of a multirun without a directory\n")
        sections += [
            f"- `{job.sweep_dir}` job {job.job_num}: "
            + (f"`{' '.join(job.overrides)}`" if job.overrides else "")
            for job in study.missing
        ]
    if notes or study.notes:
        sections.append("\n## Notes\n")
        sections += [f"- {note}" for note in [*study.notes, *notes]]
    return "\n".join(sections) + "\n"


def default_out_dir(paths: list[Path]) -> Path:
    resolved = [str(path.resolve()) for path in paths]
    return Path(os.path.commonpath(resolved))


@dataclass
class Comparison:
    """A study gathered and compared: what ``report`` writes and ``reidreg.dashboard`` shows."""

    paths: list[Path]  # the directories given
    study: Study
    rows: list[Row]
    labels: dict[int, str]  # id(run) -> method name
    text: str  # the Markdown report

    @property
    def common_dir(self) -> Path:
        """Where the outputs go by default: the directory given, or the common parent of several."""
        return default_out_dir(self.paths)


def compare(
    paths: list[Path],
    *,
    baseline: str | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    samples: int = DEFAULT_SAMPLES,
    allow_mixed: bool = False,
    power: float = DEFAULT_POWER,
    sequential: SequentialDesign | None = None,
    plan: bool = False,
) -> Comparison:
    """Gather the runs under ``paths`` and compare their methods; nothing is written.

    ``FileNotFoundError`` without runs; ``ConfigError`` when runs of one dataset differ in what they
    measure (``reidreg.reporting.environment.mixed_runs``), unless ``allow_mixed``.
    """
    study = gather(paths)
    if not study.runs:
        raise FileNotFoundError(f"no run directory (config.yaml, test_metrics.json or .hydra/) under {paths}")
    finished = study.finished
    labels = method_labels(study.runs)
    rows, notes = build_rows(
        study.runs,
        labels,
        baseline=baseline,
        alpha=alpha,
        seed=seed,
        samples=samples,
        power=power,
        sequential=sequential,
    )
    notes += comparability_notes(finished, labels)
    legacy = without_provenance(finished)
    if legacy:
        which = (
            "all of them" if len(legacy) == len(finished) else ", ".join(f"`{run.run_dir}`" for run in legacy)
        )
        notes.append(
            f"{len(legacy)} of the {len(finished)} runs in the table have no run.json (made before reidreg "
            "recorded it): counted as finished because they have test_metrics.json; their status, "
            f"environment, speed and memory are unknown and not checked ({which})"
        )
    common = default_out_dir(paths)

    def describe(run: Run) -> str:
        where = run.run_dir.relative_to(common) if run.run_dir != common else Path(run.run_dir.name)
        return f"`{where}` ({labels[id(run)]}, seed {run.seed})"

    mixed = mixed_runs(finished, describe)
    if mixed and not allow_mixed:
        raise ConfigError(mixing_refusal(mixed))
    text = render(study, rows, notes, paths=paths, alpha=alpha, describe=describe, mixed=mixed)
    if plan:
        text += plan_section(rows, study.runs) + "\n"
    return Comparison(paths=list(paths), study=study, rows=rows, labels=labels, text=text)


def write_report(comparison: Comparison, out_dir: Path | None = None, *, plots: bool = True) -> list[Path]:
    """``report.md``, ``report.csv`` and (with ``plots``) the figures into ``out_dir``; the files written."""
    out_dir = out_dir or comparison.common_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md", out_dir / "report.csv"]
    written[0].write_text(comparison.text)
    write_csv(comparison.rows, written[1])
    if plots and comparison.rows:
        from reidreg.reporting.plots import lambda_figures, map_figure  # matplotlib only when plotting

        written.append(map_figure(comparison.rows, out_dir / "map.png"))
        written += lambda_figures(comparison.rows, out_dir)
    return written


def report(
    paths: list[Path],
    *,
    out_dir: Path | None = None,
    plots: bool = True,
    **options: Any,
) -> tuple[str, list[Path]]:
    """Write the report of the runs under ``paths`` (``compare``'s ``options``); returns its Markdown text
    and the files written. Nothing is written when ``compare`` refuses the study."""
    comparison = compare(paths, **options)
    return comparison.text, write_report(comparison, out_dir, plots=plots)


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """The study and how to compare it: the arguments ``report`` and ``reidreg.dashboard`` share."""
    parser.add_argument("paths", nargs="+", type=Path, help="multirun directories and/or run directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the directory given)"
    )
    parser.add_argument("--baseline", default=None, help="method to compare with (default: none)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--bootstrap-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"bootstrap replicates (default {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare runs that differ in dataset content, precision or device class (marked in the report)",
    )
    parser.add_argument(
        "--power",
        type=float,
        default=DEFAULT_POWER,
        help=f"power the seeds-needed figures aim at (default {DEFAULT_POWER})",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="apply a Pocock group-sequential rule to each paired comparison: stop, continue or futile",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="add the seeds to run per method, and the reidreg.train command that runs them",
    )
    parser.add_argument(
        "--min-seeds",
        type=int,
        default=DEFAULT_MIN_PAIRS,
        help=f"first look of --sequential, in pairs (default {DEFAULT_MIN_PAIRS})",
    )
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=DEFAULT_MAX_PAIRS,
        help=f"last look of --sequential, in pairs (default {DEFAULT_MAX_PAIRS})",
    )


def check_comparison_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Refuse out-of-range options (``parser.error``: one ``error:`` line, exit 2); ``compare``'s keyword
    arguments from ``args``."""
    if not 0 < args.power < 1:
        parser.error(f"--power must be between 0 and 1 (got {args.power})")
    if not 2 <= args.min_seeds <= args.max_seeds <= MAX_LOOKS:
        parser.error(
            f"--min-seeds must be at least 2 and at most --max-seeds, itself at most {MAX_LOOKS} "
            f"(got {args.min_seeds} and {args.max_seeds})"
        )
    if args.bootstrap_samples < 100:
        parser.error(f"--bootstrap-samples must be at least 100 (got {args.bootstrap_samples})")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1 (got {args.alpha})")
    return {
        "baseline": args.baseline,
        "alpha": args.alpha,
        "seed": args.seed,
        "samples": args.bootstrap_samples,
        "allow_mixed": args.allow_mixed,
        "power": args.power,
        "plan": args.plan,
        "sequential": (
            SequentialDesign(args.alpha, min_pairs=args.min_seeds, max_pairs=args.max_seeds)
            if args.sequential
            else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reidreg.report", description=__doc__.split("\n\n")[0])
    add_comparison_arguments(parser)
    parser.add_argument("--no-plots", action="store_true", help="only the Markdown and CSV tables")
    args = parser.parse_args(argv)
    options = check_comparison_arguments(parser, args)
    try:
        text, written = report(args.paths, out_dir=args.out, plots=not args.no_plots, **options)
    except (FileNotFoundError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    print("Written: " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
