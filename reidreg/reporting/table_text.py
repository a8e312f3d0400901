"""The rows of ``reidreg.reporting.table`` as text: three Markdown tables (the primary metric with its
tests, the secondary metrics, the cost), their legend, and one CSV row per method × dataset.

Every "n/a" says why in the cell itself (``n/a (1 pair)``, ``n/a (no variance)``, ``n/a (n<6)``), so
the legend cannot disagree with the table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from reidreg.reporting.bootstrap import CONFIDENCE as BOOTSTRAP_CONFIDENCE
from reidreg.reporting.stats import CONFIDENCE, MAX_SIGN_FLIP_PAIRS, PAIRED, Summary, sign_flip_min_pairs
from reidreg.reporting.table import METRICS, PRIMARY, THROUGHPUT_FACTOR, MetricComparison, Row

SECONDARY = tuple(metric for metric in METRICS if metric != PRIMARY)
NO_RUN = "— (no finished run)"


def _number(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _mean_std(summary: Summary) -> str:
    return _number(summary.mean) if summary.n < 2 else f"{summary.mean:.2f} ± {summary.std:.2f}"


def _p(value: float | None, why: str | None) -> str:
    return f"n/a ({why})" if value is None else f"{value:.3g}"


def _delta(comparison: MetricComparison, star: str = "") -> str:
    difference = comparison.difference
    text = f"{difference.delta:+.2f}{star}"
    if difference.low is not None:
        text += f" [{difference.low:+.2f}, {difference.high:+.2f}]"
    return text


def _pairing(row: Row) -> str:
    difference = row.metrics[PRIMARY].difference
    if difference.test == PAIRED:
        return f"{row.baseline}: {difference.pairs} pair{'s' * (difference.pairs != 1)}"
    return f"{row.baseline}: unpaired (Welch)"


def _method(row: Row) -> str:
    return row.method + (" (search)" if row.search else "")


def primary_table(rows: list[Row]) -> str:
    header = [
        "method",
        "dataset",
        "runs",
        f"{PRIMARY} (%)",
        f"Δ {PRIMARY} [{CONFIDENCE:.0%} CI]",
        "vs, pairs",
        "p (Holm)",
        "sign-flip p (Holm)",
        f"bootstrap Δ [{BOOTSTRAP_CONFIDENCE:.0%}]",
        "P(A>B) [95%]",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * 7) + "|"]
    for row in rows:
        cells = [_method(row), row.dataset, row.outcomes()]
        if not row.runs:
            cells += [NO_RUN] + [""] * 6
        elif row.is_baseline:
            cells += [_mean_std(row.metrics[PRIMARY].summary), "baseline"] + [""] * 5
        elif row.metrics[PRIMARY].difference is None:
            cells += [_mean_std(row.metrics[PRIMARY].summary)] + [""] * 6
        else:
            comparison = row.metrics[PRIMARY]
            difference, boot = comparison.difference, comparison.bootstrap
            cells += [
                _mean_std(comparison.summary),
                _delta(comparison, "*" if comparison.significant else ""),
                _pairing(row),
                _p(comparison.p_holm, difference.why_no_test),
                _p(comparison.p_sign_flip_holm, difference.why_no_sign_flip),
                f"[{boot.low:+.2f}, {boot.high:+.2f}]" if boot else f"n/a ({comparison.why_no_bootstrap})",
                (
                    f"{boot.p_improvement:.2f} [{boot.p_improvement_low:.2f}, {boot.p_improvement_high:.2f}]"
                    if boot
                    else ""
                ),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def secondary_table(rows: list[Row]) -> str:
    header = ["method", "dataset"]
    for metric in SECONDARY:
        header += [f"{metric} (%)", f"Δ {metric} [{CONFIDENCE:.0%} CI]", "p"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["--:"] * 3 * len(SECONDARY)) + "|",
    ]
    for row in rows:
        cells = [_method(row), row.dataset]
        for metric in SECONDARY:
            if not row.runs:
                cells += [NO_RUN, "", ""]
                continue
            comparison = row.metrics[metric]
            if row.is_baseline or comparison.difference is None:
                cells += [_mean_std(comparison.summary), "baseline" if row.is_baseline else "", ""]
            else:
                difference = comparison.difference
                cells += [
                    _mean_std(comparison.summary),
                    _delta(comparison),
                    _p(difference.p, difference.why_no_test),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _range(values: list[float], spec: str) -> str:
    return f" ({min(values):{spec}}–{max(values):{spec}})" if len(values) > 1 else ""


def cost_table(rows: list[Row]) -> str:
    header = ["method", "dataset", "img/s median (min–max)", "img/s ÷ base", "peak MiB max (min–max)", "flag"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * 3 + ["---"]) + "|"]
    for row in rows:
        cost = row.cost
        speed = _number(cost.img_per_s, ".1f") + (
            _range(cost.img_per_s_values, ".1f") if cost.img_per_s else ""
        )
        ratio = "baseline" if row.is_baseline and cost.img_per_s else _number(cost.img_per_s_ratio)
        memory = _number(cost.peak_memory_mib, ".0f") + (
            _range(cost.peak_memory_values, ".0f") if cost.peak_memory_mib else ""
        )
        flag = (
            f"{len(cost.outliers)} run(s) > {THROUGHPUT_FACTOR}× off the median img/s"
            if cost.outliers
            else ""
        )
        lines.append("| " + " | ".join([_method(row), row.dataset, speed, ratio, memory, flag]) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    return "\n\n".join(
        [
            f"### Primary metric: test {PRIMARY}\n\n" + primary_table(rows),
            "### Secondary metrics (not corrected, never starred)\n\n" + secondary_table(rows),
            "### Cost\n\n" + cost_table(rows),
        ]
    )


def legend(alpha: float) -> str:
    minimum = sign_flip_min_pairs(alpha)
    sentences = [
        "runs: finished/launched (run directories found; jobs of a multirun that left none are listed",
        "under Missing runs), then how the others ended; only finished runs are averaged.",
        "Metrics in %, mean ± sample std (ddof = 1) over the seeds (a seed run twice counts once).",
        f"Δ: method − baseline of the same dataset, in points, with its {CONFIDENCE:.0%} t interval: paired",
        "over the seeds both have (mean of the per-seed differences), or Welch's unpaired interval where",
        "fewer than 2 seeds are shared ('vs, pairs' says which, and names the baseline).",
        "p (Holm): two-sided paired t test (or Welch), Holm-corrected over the methods compared with that",
        f"baseline; * = that p < α = {alpha}.",
        "sign-flip p (Holm): exact two-sided permutation test of the per-seed differences, computed",
        f"with {minimum} to {MAX_SIGN_FLIP_PAIRS} pairs (fewer cannot reach p < {alpha}), Holm-corrected",
        "the same way.",
        "n/a: no test, the reason in brackets (a single pair, identical differences, too few pairs,",
        "an unpaired comparison, no per-query results).",
        f"bootstrap Δ: {BOOTSTRAP_CONFIDENCE:.0%} interval of Δ mAP from the two-level paired bootstrap",
        "(seeds, and test identities with all their queries); P(A>B): share of paired seeds where the",
        "method's mAP beats the baseline's, with its bootstrap interval.",
        "Secondary metrics: raw p of the same test, no correction, no star.",
        "(search): one of several rows differing only in a numeric regularizer option.",
        "Cost, from run.json: median training throughput over the seeds with its range; that median ÷",
        "the baseline's (below 1 = slower); the largest peak memory with its range; flag: runs whose",
        f"throughput is more than {THROUGHPUT_FACTOR}× above or below their method's median (named in the",
        "notes); n/a: not recorded.",
    ]
    return " ".join(sentences)


def write_csv(rows: list[Row], path: Path) -> None:
    fields = [
        "method",
        "dataset",
        "search",
        "finished",
        "launched",
        "n",
        "seeds",
        "baseline",
        "compared_with",
    ]
    for metric in METRICS:
        fields += [
            f"{metric}_{key}"
            for key in (
                "mean",
                "std",
                "delta",
                "delta_low",
                "delta_high",
                "test",
                "pairs",
                "p",
                "p_holm",
                "p_sign_flip",
                "p_sign_flip_holm",
                "significant",
                "values",
            )
        ]
    fields += [
        "mAP_bootstrap_low",
        "mAP_bootstrap_high",
        "mAP_p_improvement",
        "mAP_p_improvement_low",
        "mAP_p_improvement_high",
        "mAP_pairs_needed",
        "mAP_sequential",
        "train_img_per_s_median",
        "train_img_per_s_ratio",
        "train_img_per_s_values",
        "train_img_per_s_outliers",
        "train_ms_per_step_median",
        "peak_memory_mib_max",
        "peak_memory_mib_values",
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
        writer.writeheader()
        for row in rows:
            record = {
                "method": row.method,
                "dataset": row.dataset,
                "search": ";".join(row.search),
                "finished": len(row.runs),
                "launched": len(row.launched),
                "n": len(row.metrics[PRIMARY].values) if row.runs else 0,
                "seeds": ";".join(map(str, row.seeds)),
                "baseline": row.is_baseline,
                "compared_with": row.baseline or "",
            }
            for metric, comparison in row.metrics.items():
                difference = comparison.difference
                record |= {
                    f"{metric}_mean": comparison.summary.mean,
                    f"{metric}_std": _blank(comparison.summary.std),
                    f"{metric}_significant": _blank(comparison.significant),
                    f"{metric}_values": ";".join(f"{value:.4f}" for value in comparison.values.values()),
                    f"{metric}_p_holm": _blank(comparison.p_holm),
                    f"{metric}_p_sign_flip_holm": _blank(comparison.p_sign_flip_holm),
                }
                if difference is not None:
                    record |= {
                        f"{metric}_delta": difference.delta,
                        f"{metric}_delta_low": _blank(difference.low),
                        f"{metric}_delta_high": _blank(difference.high),
                        f"{metric}_test": difference.test,
                        f"{metric}_pairs": difference.pairs,
                        f"{metric}_p": _blank(difference.p),
                        f"{metric}_p_sign_flip": _blank(difference.p_sign_flip),
                    }
            boot = row.metrics[PRIMARY].bootstrap if row.runs else None
            if boot is not None:
                record |= {
                    "mAP_bootstrap_low": boot.low,
                    "mAP_bootstrap_high": boot.high,
                    "mAP_p_improvement": boot.p_improvement,
                    "mAP_p_improvement_low": boot.p_improvement_low,
                    "mAP_p_improvement_high": boot.p_improvement_high,
                }
            plan = row.metrics[PRIMARY].plan if row.runs else None
            if plan is not None:  # empty where the plan has no number (its note says why)
                record["mAP_pairs_needed"] = _blank(plan.needed)
                sequential = row.metrics[PRIMARY].sequential
                record["mAP_sequential"] = sequential.outcome if sequential else ""
            cost = row.cost
            record |= {
                "train_img_per_s_median": _blank(cost.img_per_s),
                "train_img_per_s_ratio": _blank(cost.img_per_s_ratio),
                "train_img_per_s_values": ";".join(f"{value:.2f}" for value in cost.img_per_s_values),
                "train_img_per_s_outliers": ";".join(str(run.run_dir) for run, _ in cost.outliers),
                "train_ms_per_step_median": _blank(cost.ms_per_step),
                "peak_memory_mib_max": _blank(cost.peak_memory_mib),
                "peak_memory_mib_values": ";".join(f"{value:.1f}" for value in cost.peak_memory_values),
            }
            writer.writerow(record)


def _blank(value: float | bool | None) -> float | bool | str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
