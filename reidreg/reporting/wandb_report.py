"""The W&B Report of a comparison, built with W&B's own ``wandb_workspaces.reports.v2``.

One section per dataset (``SECTIONS``, in this order, the same as ``dashboard.html``'s):

1. test mAP, R1 and mINP by method: bar charts of the runs' summaries grouped by W&B group (one group per
   method, ``reidreg.utils.loggers.wandb_group``), mean over seeds with every seed shown;
2. the paired Δ mAP against the baseline with its CI: the report's own table (``primary_table`` of the
   comparison's rows, so the numbers are ``reidreg.report``'s, never recomputed);
3. validation mAP over epochs per method: mean with the range over seeds;
4. adaptive L2's median λ per parameter category over steps (AdaptiveReID Fig. 3), for methods that log it;
5. cost: training throughput (img/s) and peak memory per method, and the report's cost table.

The panels read the runs from W&B through a runset filtered to the study's W&B groups, so they stay live:
a seed added to a method later shows up. The groups come from each run's ``run.json`` (``wandb_group``).
In the specification the runsets name the Report's project but no entity (with an entity the library looks
the project up on W&B just to write it); ``name_runsets`` gives them the entity before saving.

This module imports ``wandb_workspaces`` (the ``dashboard`` extra): only ``reidreg.dashboard`` imports it.
The specification is the library's own model of the Report (``Report._to_model()``, private; no public
serializer exists), dumped as ``Report.save`` sends it; ``report_from_spec`` reads it back through the same
models, which validates it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr
from wandb_workspaces.reports.v2 import internal

from reidreg.metric_keys import (
    EPOCH,
    IMG_PER_S,
    LAMBDA_MEDIAN_KEY,
    PEAK_MEMORY_MIB,
    TEST,
    VAL,
    metric_key,
    performance_key,
)
from reidreg.reporting.gather import Run
from reidreg.reporting.table import METRICS, PRIMARY, Row
from reidreg.reporting.table_text import cost_table, primary_table
from reidreg.run_dir import CSV_METRICS

SECTIONS = (
    "Test metrics by method",
    f"Paired Δ {PRIMARY} against the baseline",
    f"Validation {PRIMARY} over epochs",
    "Adaptive L2: median λ per category",
    "Cost",
)
GROUP = "Group"  # the run attribute panels group by (W&B's name for it)
STEP = "Step"  # W&B's x axis of logged steps


@dataclass
class DatasetSelection:
    """Which W&B runs one dataset's section shows."""

    dataset: str
    groups: dict[str, list[str]]  # method -> its runs' W&B groups (one, unless a run was given its own)
    ungrouped: list[Run]  # runs without a recorded W&B group (made before run.json had one)


def select(rows: list[Row], dataset: str) -> DatasetSelection:
    groups: dict[str, list[str]] = {}
    ungrouped = []
    for row in (row for row in rows if row.dataset == dataset):
        for run in row.launched:
            group = (run.info or {}).get("wandb_group")
            if group and str(group) not in groups.setdefault(row.method, []):
                groups[row.method].append(str(group))
            elif not group:
                ungrouped.append(run)
    return DatasetSelection(dataset, groups, ungrouped)


def lambda_keys(runs: list[Run]) -> list[str]:
    """The adaptive-λ median keys (``reg/<name>/lambda_median/<category>``) the runs' CSV logs have."""
    keys: dict[str, None] = {}
    for run in runs:
        path = run.run_dir / CSV_METRICS
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            keys.update((key, None) for key in header if LAMBDA_MEDIAN_KEY.match(key))
    return list(keys)


def _runset(selection: DatasetSelection, project: str) -> wr.Runset:
    # No entity: with one, the library looks the project up on W&B to write the spec (``name_runsets``).
    return wr.Runset(
        project=project,
        name=f"{selection.dataset}: {len(selection.groups)} methods",
        filters=[
            expr.Metric(GROUP).isin(sorted({g for groups in selection.groups.values() for g in groups}))
        ],
        groupby=["group"],
    )


def _grid(runset: wr.Runset, panels: list) -> wr.PanelGrid:
    width = 24 // max(1, min(3, len(panels)))
    for index, panel in enumerate(panels):
        panel.layout = wr.Layout(x=(index % 3) * width, y=(index // 3) * 8, w=width, h=8)
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _bars(title: str, key: str) -> wr.BarPlot:
    """A run summary's ``key`` per method: the mean over its runs, each run shown (W&B's "samples")."""
    return wr.BarPlot(
        title=title,
        metrics=[wr.SummaryMetric(key)],
        orientation="v",
        groupby=GROUP,
        groupby_aggfunc="mean",
        groupby_rangefunc="samples",
    )


def _lines(title: str, x: str, key: str, aggregate: str) -> wr.LinePlot:
    return wr.LinePlot(
        title=title,
        x=x,
        y=[key],
        groupby=GROUP,
        groupby_aggfunc=aggregate,
        groupby_rangefunc="minmax",
    )


def _method_table(selection: DatasetSelection) -> str:
    lines = ["| method | W&B group |", "|---|---|"]
    lines += [
        f"| {method} | {', '.join(f'`{g}`' for g in groups)} |" for method, groups in selection.groups.items()
    ]
    return "\n".join(lines)


def dataset_blocks(rows: list[Row], dataset: str, project: str) -> list:
    """The blocks of one dataset's section (``SECTIONS``)."""
    mine = [row for row in rows if row.dataset == dataset]
    selection = select(rows, dataset)
    runset = _runset(selection, project)
    blocks: list = [
        wr.H1(dataset),
        wr.P(f"{len(mine)} methods; each panel groups the runs of one method by its W&B group:"),
        wr.MarkdownBlock(_method_table(selection)),
    ]
    if selection.ungrouped:
        blocks.append(
            wr.P(
                f"{len(selection.ungrouped)} run(s) have no W&B group in their run.json (made before reidreg "
                "recorded it) and are not selected: "
                + ", ".join(str(run.run_dir) for run in selection.ungrouped[:5])
            )
        )
    # W&B holds the metrics as logged: fractions, not the report's %.
    test_panels = [_bars(f"test {metric}", metric_key(TEST, metric)) for metric in METRICS]
    blocks += [wr.H2(SECTIONS[0]), _grid(runset, test_panels)]
    blocks += [wr.H2(SECTIONS[1]), wr.MarkdownBlock(primary_table(mine))]
    val_panel = _lines(
        f"validation {PRIMARY} (mean, range over seeds)", EPOCH, metric_key(VAL, PRIMARY), "mean"
    )
    blocks += [wr.H2(SECTIONS[2]), _grid(runset, [val_panel])]
    keys = lambda_keys([run for row in mine for run in row.runs])
    if keys:
        panels = [
            _lines(f"median λ: {LAMBDA_MEDIAN_KEY.match(key)['category']}", STEP, key, "median")
            for key in keys
        ]
        blocks += [wr.H2(SECTIONS[3]), _grid(runset, panels)]
    else:
        blocks += [wr.H2(SECTIONS[3]), wr.P("No method of this dataset uses adaptive L2.")]
    cost_panels = [
        _bars("training throughput (img/s)", performance_key(IMG_PER_S)),
        _bars("peak memory (MiB)", performance_key(PEAK_MEMORY_MIB)),
    ]
    blocks += [wr.H2(SECTIONS[4]), _grid(runset, cost_panels), wr.MarkdownBlock(cost_table(mine))]
    return blocks


def build_report(
    rows: list[Row], *, title: str, entity: str, project: str, description: str = ""
) -> wr.Report:
    """The Report of a comparison's rows; ``entity`` may be "" (the spec then names none: set it to save)."""
    blocks = [wr.TableOfContents()]
    for dataset in dict.fromkeys(row.dataset for row in rows):
        blocks += dataset_blocks(rows, dataset, project)
    return wr.Report(
        project=project, entity=entity, title=title[:128], description=description, blocks=blocks
    )


def name_runsets(report: wr.Report) -> None:
    """Give every runset the Report's entity and project, as saving needs (the library then looks the
    project up on W&B: online only)."""
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            for runset in block.runsets:
                runset.entity, runset.project = report.entity, report.project


def report_spec(report: wr.Report) -> str:
    """The Report's specification as JSON: the library's model of it, whose ``spec`` ``Report.save`` sends,
    with its title, description, entity and project."""
    return report._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def report_from_spec(text: str) -> wr.Report:
    """The Report of a specification, through the library's models (``pydantic`` validates every field)."""
    return wr.Report._from_model(internal.ReportViewspec.model_validate_json(text))


def write_spec(report: wr.Report, path: Path) -> Path:
    text = report_spec(report)
    report_from_spec(text)  # refuse to write what the library would not read back
    path.write_text(text + "\n")
    return path
