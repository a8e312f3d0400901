"""The comparison table: one row per method × dataset, its test metrics over seeds and its difference
to the baseline of the same dataset, with the test of ``reidreg.reporting.stats``, and its cost; as
Markdown and CSV.

Cost, from each run's ``run.json`` ``performance`` (runs without it are left out of these figures): the
median training throughput over seeds (images per second) and its ratio to the baseline's median (below 1:
slower than the baseline), the median time per training step, and the largest peak memory of the seeds
(MiB; what a run of the method needs).

The baseline is ``--baseline`` if given, else the method ``none``, else the first method trained without
a regularizer (in a study of presets: the first preset, e.g. ``table3_1_minimal/none``).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reidreg.reporting.gather import Run
from reidreg.reporting.stats import Summary, holm_adjust, summarize, welch_p_value

METRICS = ("mAP", "R1", "mINP")  # shown; test_metrics.json also has R5 and R10


@dataclass
class MetricComparison:
    summary: Summary  # in %
    values: list[float]  # per run, in %
    delta: float | None = None  # mean − baseline mean, in points; None without a baseline
    p: float | None = None  # Welch's two-sided p-value; None when there is no test
    p_holm: float | None = None
    significant: bool | None = None


@dataclass
class Cost:
    """What a method's runs cost, from run.json; None where no run recorded it."""

    img_per_s: float | None  # median over seeds
    ms_per_step: float | None  # median over seeds
    peak_memory_mib: float | None  # largest over seeds
    img_per_s_values: list[float] = field(default_factory=list)  # per run that recorded it
    peak_memory_values: list[float] = field(default_factory=list)
    img_per_s_ratio: float | None = None  # median img/s ÷ the baseline's median img/s

    @classmethod
    def of(cls, runs: list[Run]) -> Cost:
        def recorded(key: str) -> list[float]:
            values = [run.performance.get(key) for run in runs]
            return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]

        img_per_s, ms_per_step, memory = (
            recorded(key) for key in ("train_img_per_s", "train_ms_per_step", "peak_memory_mib")
        )
        return cls(
            img_per_s=float(np.median(img_per_s)) if img_per_s else None,
            ms_per_step=float(np.median(ms_per_step)) if ms_per_step else None,
            peak_memory_mib=max(memory) if memory else None,
            img_per_s_values=img_per_s,
            peak_memory_values=memory,
        )


@dataclass
class Row:
    method: str
    dataset: str
    runs: list[Run]
    is_baseline: bool = False
    metrics: dict[str, MetricComparison] = field(default_factory=dict)
    cost: Cost = field(default_factory=lambda: Cost(None, None, None))

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]


def _choose_baseline(rows: list[Row], requested: str | None) -> Row | None:
    if requested is not None:
        return next((row for row in rows if row.method == requested), None)
    return next((row for row in rows if row.method == "none"), None) or next(
        (row for row in rows if all(run.regularizer == "none" for run in row.runs)), None
    )


def build_rows(
    runs: list[Run], labels: dict[int, str], *, baseline: str | None = None, alpha: float = 0.05
) -> tuple[list[Row], list[str]]:
    """The table's rows (per dataset: baseline first, then methods in order of first appearance) and notes."""
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        grouped.setdefault((labels[id(run)], run.dataset), []).append(run)
    rows, notes = [], []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        dataset_rows = [Row(method, d, members) for (method, d), members in grouped.items() if d == dataset]
        for row in dataset_rows:
            for metric in METRICS:
                values = [100 * float(run.metrics[f"test/{metric}"]) for run in row.runs]
                row.metrics[metric] = MetricComparison(summarize(values), values)
            row.cost = Cost.of(row.runs)
            repeated = [seed for seed, count in Counter(map(str, row.seeds)).items() if count > 1]
            if repeated:
                notes.append(
                    f"{row.method} on {dataset}: seed(s) {', '.join(repeated)} run twice or more, all counted"
                )
        reference = _choose_baseline(dataset_rows, baseline)
        if reference is None:
            wanted = f"--baseline {baseline}" if baseline else "a method without regularizer"
            notes.append(f"{dataset}: no baseline ({wanted} has no run on it), so no differences are shown")
        else:
            reference.is_baseline = True
            dataset_rows.remove(reference)
            dataset_rows.insert(0, reference)
            _compare(dataset_rows, reference, alpha)
        rows += dataset_rows
    return rows, notes


def _compare(rows: list[Row], reference: Row, alpha: float) -> None:
    """Fill delta, p, Holm-adjusted p and significance of every row against ``reference``, per metric."""
    others = [row for row in rows if row is not reference]
    if reference.cost.img_per_s:
        for row in rows:
            if row.cost.img_per_s is not None:
                row.cost.img_per_s_ratio = row.cost.img_per_s / reference.cost.img_per_s
    for metric in METRICS:
        base = reference.metrics[metric]
        for row in others:
            comparison = row.metrics[metric]
            comparison.delta = comparison.summary.mean - base.summary.mean
            comparison.p = welch_p_value(comparison.values, base.values)
        adjusted = holm_adjust([row.metrics[metric].p for row in others])
        for row, p_holm in zip(others, adjusted, strict=True):
            row.metrics[metric].p_holm = p_holm
            row.metrics[metric].significant = None if p_holm is None else p_holm < alpha


def _number(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _mean_std(summary: Summary) -> str:
    return _number(summary.mean) if summary.n < 2 else f"{summary.mean:.2f} ± {summary.std:.2f}"


def markdown_table(rows: list[Row]) -> str:
    header = ["method", "dataset", "n"]
    for metric in METRICS:
        header += [f"{metric} (%)", f"Δ {metric}", "p"]
    header += ["img/s", "img/s ÷ base", "peak MiB"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---", "--:"] + ["--:"] * (3 * len(METRICS) + 3)) + "|",
    ]
    for row in rows:
        cells = [row.method, row.dataset, str(len(row.runs))]
        for metric in METRICS:
            comparison = row.metrics[metric]
            if row.is_baseline:
                cells += [_mean_std(comparison.summary), "baseline", ""]
            elif comparison.delta is None:
                cells += [_mean_std(comparison.summary), "", ""]
            else:
                star = "*" if comparison.significant else ""
                cells += [
                    _mean_std(comparison.summary),
                    f"{comparison.delta:+.2f}{star}",
                    _number(comparison.p, ".3f"),
                ]
        ratio = "baseline" if row.is_baseline and row.cost.img_per_s else _number(row.cost.img_per_s_ratio)
        cells += [_number(row.cost.img_per_s, ".1f"), ratio, _number(row.cost.peak_memory_mib, ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(alpha: float) -> str:
    return (
        "Test metrics in %, mean ± sample std (ddof = 1) over the n seeds. Δ: difference of means to the "
        "baseline on the same dataset, in points. p: Welch's two-sided t-test over seeds (unequal "
        f"variances); * = significant at α = {alpha} after Holm's correction over the methods compared "
        "with that baseline (per metric and dataset). n/a: fewer than 2 seeds on a side, no test. "
        "img/s: median training throughput over the seeds (run.json); img/s ÷ base: that median divided by "
        "the baseline's (below 1 = slower); peak MiB: the largest peak memory of the seeds; n/a: not "
        "recorded."
    )


def write_csv(rows: list[Row], path: Path) -> None:
    fields = ["method", "dataset", "n", "seeds", "baseline"]
    for metric in METRICS:
        fields += [
            f"{metric}_{key}" for key in ("mean", "std", "delta", "p", "p_holm", "significant", "values")
        ]
    fields += [
        "train_img_per_s_median",
        "train_img_per_s_ratio",
        "train_img_per_s_values",
        "train_ms_per_step_median",
        "peak_memory_mib_max",
        "peak_memory_mib_values",
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            record = {
                "method": row.method,
                "dataset": row.dataset,
                "n": len(row.runs),
                "seeds": ";".join(map(str, row.seeds)),
                "baseline": row.is_baseline,
            }
            for metric, comparison in row.metrics.items():
                record |= {
                    f"{metric}_mean": comparison.summary.mean,
                    f"{metric}_std": "" if math.isnan(comparison.summary.std) else comparison.summary.std,
                    f"{metric}_delta": "" if comparison.delta is None else comparison.delta,
                    f"{metric}_p": "" if comparison.p is None else comparison.p,
                    f"{metric}_p_holm": "" if comparison.p_holm is None else comparison.p_holm,
                    f"{metric}_significant": "" if comparison.significant is None else comparison.significant,
                    f"{metric}_values": ";".join(f"{value:.4f}" for value in comparison.values),
                }
            cost = row.cost
            record |= {
                "train_img_per_s_median": _blank_if_none(cost.img_per_s),
                "train_img_per_s_ratio": _blank_if_none(cost.img_per_s_ratio),
                "train_img_per_s_values": ";".join(f"{value:.2f}" for value in cost.img_per_s_values),
                "train_ms_per_step_median": _blank_if_none(cost.ms_per_step),
                "peak_memory_mib_max": _blank_if_none(cost.peak_memory_mib),
                "peak_memory_mib_values": ";".join(f"{value:.1f}" for value in cost.peak_memory_values),
            }
            writer.writerow(record)


def _blank_if_none(value: float | None) -> float | str:
    return "" if value is None else value
