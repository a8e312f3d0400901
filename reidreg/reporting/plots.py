"""Figures of a comparison (matplotlib, Agg backend: no display needed).

- ``map.png``: test mAP per method and dataset, bars at the mean with the sample std as error bars and
  every seed as a dot, so that the spread behind each bar is visible.
- ``lambda_median_<method>_<dataset>.png``: for methods with adaptive L2, the median λ per parameter
  category over training (AdaptiveReID Fig. 3) from each run's ``csv/metrics.csv`` columns
  ``reg/<name>/lambda_median/<category>``: the median over seeds at every logged step, with the range
  over seeds shaded.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from reidreg.metric_keys import LAMBDA_MEDIAN_KEY  # noqa: E402
from reidreg.reporting.gather import Run  # noqa: E402
from reidreg.reporting.table import Row  # noqa: E402
from reidreg.run_dir import CSV_METRICS  # noqa: E402


def map_figure(rows: list[Row], path: Path) -> Path:
    methods = list(dict.fromkeys(row.method for row in rows))
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    width = 0.8 / len(datasets)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) * len(datasets) ** 0.5 + 2), 4.5))
    for index, dataset in enumerate(datasets):
        offset = (index - (len(datasets) - 1) / 2) * width
        for row in (row for row in rows if row.dataset == dataset and row.runs):
            x = methods.index(row.method) + offset
            summary = row.metrics["mAP"].summary
            error = None if summary.n < 2 else summary.std
            axis.bar(x, summary.mean, width, yerr=error, capsize=3, color=f"C{index}", alpha=0.75)
            seeds = list(row.metrics["mAP"].values.values())
            axis.scatter(np.full(summary.n, x), seeds, color="black", s=8, zorder=3)
        axis.bar(0, 0, 0, color=f"C{index}", label=dataset)  # legend entry only
    axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    axis.set(ylabel="test mAP (%)", title="test mAP: mean ± std over seeds (dots: seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def lambda_history(run: Run) -> dict[str, dict[int, float]]:
    """category -> {step: median λ} from a run's csv/metrics.csv ({} without adaptive L2 columns)."""
    path = run.run_dir / CSV_METRICS
    if not path.is_file():
        return {}
    history: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(newline="") as file:
        for record in csv.DictReader(file):
            for column, value in record.items():
                match = LAMBDA_MEDIAN_KEY.match(column or "")
                if match and value not in ("", None):
                    history[match["category"]][int(float(record["step"]))] = float(value)
    return dict(history)


def over_seeds(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Every step any run logged, with the median, minimum and maximum over the runs that logged it."""
    steps = sorted(set().union(*series))
    at_step = [[run[step] for run in series if step in run] for step in steps]
    return (
        steps,
        [float(np.median(v)) for v in at_step],
        [min(v) for v in at_step],
        [max(v) for v in at_step],
    )


def lambda_figure(row: Row) -> plt.Figure | None:
    """The median λ per category over steps of one method's runs; None if none logged it."""
    histories = [h for h in (lambda_history(run) for run in row.runs) if h]
    if not histories:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4))
    top = 0.0
    for index, category in enumerate(dict.fromkeys(c for h in histories for c in h)):
        steps, median, low, high = over_seeds([h[category] for h in histories if category in h])
        axis.plot(steps, median, color=f"C{index}", label=category)
        axis.fill_between(steps, low, high, color=f"C{index}", alpha=0.2)
        top = max(top, *high)
    axis.set(xlabel="step", ylabel="median λ of the category (median over seeds)")
    axis.set_title(f"{row.method} on {row.dataset}, {len(histories)} seed(s)", fontsize=10)
    axis.set_ylim(0, 1.1 * top or 1.0)  # λ starts at A/2: room above it, so the curves stay visible
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def lambda_figures(rows: list[Row], out_dir: Path) -> list[Path]:
    paths = []
    for row in rows:
        figure = lambda_figure(row)
        if figure is None:
            continue
        path = out_dir / f"lambda_median_{_slug(row.method)}_{_slug(row.dataset)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")
