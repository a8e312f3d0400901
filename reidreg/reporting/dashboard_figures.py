"""The figures of ``dashboard.html``, one per panel of the W&B Report, from the run directories' files
(``test_metrics.json`` through the comparison's rows, ``csv/metrics.csv``, ``run.json``), as PNG bytes.

- ``test_metric_figure``: test mAP / R1 / mINP by method, bars at the mean over seeds, every seed a dot;
- ``validation_figure``: validation mAP over epochs per method, the mean over seeds with their range;
- ``lambda_figure`` (``reidreg.reporting.plots``): adaptive L2's median λ per category over steps;
- ``cost_figure``: training throughput (median over seeds, every run a dot) and peak memory per method.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np
from matplotlib.ticker import MaxNLocator

from reidreg.metric_keys import EPOCH, VAL, metric_key
from reidreg.reporting.plots import plt
from reidreg.reporting.table import METRICS, PRIMARY, Row
from reidreg.run_dir import CSV_METRICS


def png(figure: plt.Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _methods_axis(axis: plt.Axes, methods: list[str]) -> None:
    axis.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)


def test_metric_figure(rows: list[Row]) -> plt.Figure:
    """One bar chart per metric of ``METRICS``: mean over seeds by method, seeds as dots."""
    methods = [row.method for row in rows]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS, strict=True):
        for x, row in enumerate(rows):
            if not row.runs:
                continue
            comparison = row.metrics[metric]
            axis.bar(x, comparison.summary.mean, 0.6, color=f"C{x}", alpha=0.75)
            seeds = list(comparison.values.values())
            axis.scatter(np.full(len(seeds), x), seeds, color="black", s=10, zorder=3)
        _methods_axis(axis, methods)
        axis.set_title(f"test {metric} (%)", fontsize=10)
    figure.tight_layout()
    return figure


def validation_history(row: Row) -> list[dict[int, float]]:
    """Per finished run of the row: epoch -> validation mAP (fraction), from ``csv/metrics.csv``."""
    key = metric_key(VAL, PRIMARY)
    histories = []
    for run in row.runs:
        path = run.run_dir / CSV_METRICS
        if not path.is_file():
            continue
        history = {}
        with path.open(newline="") as file:
            for record in csv.DictReader(file):
                if record.get(key) not in ("", None) and record.get(EPOCH) not in ("", None):
                    history[int(float(record[EPOCH]))] = float(record[key])
        if history:
            histories.append(history)
    return histories


def validation_figure(rows: list[Row]) -> plt.Figure | None:
    """Validation mAP (%) over epochs per method: the mean over seeds, the range shaded; None if no run
    validated."""
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    plotted = False
    for index, row in enumerate(rows):
        histories = validation_history(row)
        if not histories:
            continue
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for history in histories:
            for epoch, value in history.items():
                by_epoch[epoch].append(100 * value)
        epochs = sorted(by_epoch)
        # Epochs are 0-based in the logs; shown 1-based, as the trainer's progress counts them.
        shown = [epoch + 1 for epoch in epochs]
        axis.plot(
            shown,
            [np.mean(by_epoch[e]) for e in epochs],
            marker="o",
            color=f"C{index}",
            label=f"{row.method} ({len(histories)} seeds)",
        )
        low, high = [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs]
        axis.fill_between(shown, low, high, color=f"C{index}", alpha=0.2)
        plotted = True
    if not plotted:
        plt.close(figure)
        return None
    axis.set(xlabel="epoch", ylabel=f"validation {PRIMARY} (%)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"validation {PRIMARY}: mean over seeds, range shaded", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def cost_figure(rows: list[Row]) -> plt.Figure | None:
    """Training throughput (median, runs as dots) and peak memory (largest, runs as dots) per method; None
    when no run recorded its cost."""
    if not any(row.cost.img_per_s_values or row.cost.peak_memory_values for row in rows):
        return None
    methods = [row.method for row in rows]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(8, 3.6))
    for x, row in enumerate(rows):
        cost = row.cost
        if cost.img_per_s is not None:
            speed.bar(x, cost.img_per_s, 0.6, color=f"C{x}", alpha=0.75)
            speed.scatter(np.full(len(cost.img_per_s_values), x), cost.img_per_s_values, color="black", s=10)
        if cost.peak_memory_mib is not None:
            memory.bar(x, cost.peak_memory_mib, 0.6, color=f"C{x}", alpha=0.75)
            memory.scatter(
                np.full(len(cost.peak_memory_values), x), cost.peak_memory_values, color="black", s=10
            )
    for axis, title in ((speed, "training throughput (img/s, median)"), (memory, "peak memory (MiB, max)")):
        _methods_axis(axis, methods)
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure
