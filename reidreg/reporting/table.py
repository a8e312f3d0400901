"""The comparison tables: one row per method × dataset, with every run launched for it, its test metrics
over seeds, its difference to the baseline of the same dataset (``reidreg.reporting.stats``, and the
per-query bootstrap of ``reidreg.reporting.bootstrap``) and its cost; as Markdown and CSV.

- Outcomes: each row counts the runs launched for it and how they ended; only finished runs are averaged.
  A method whose runs all failed keeps its row.
- Seeds: a seed's value is its run's score; a seed run more than once is averaged into one value (never
  counted twice) and left out of the pairing, and seeds only one side has are left out too; both are
  named in the notes. With at least 2 shared seeds the comparison is paired, else Welch's unpaired test.
- Primary metric: mAP. Its p values are Holm-corrected over the methods compared with one baseline
  (per dataset), and a star marks Holm p < α. R1 and mINP are secondary: raw p, never starred.
- Planning: every paired mAP comparison gets a note with the pairs its paired t test would need
  (``reidreg.reporting.power``) and, with a ``SequentialDesign``, its sequential decision.
- Searches: rows that differ only in a numeric option of the same regularizer (a λ grid) are marked as
  a search; picking the best of them by its test score overstates it.
- Cost, from each run's ``run.json`` ``performance`` (runs without it are left out of these figures): the
  median training throughput over seeds (images per second) with its range, its ratio to the baseline's
  median, and the peak memory (largest, with its range). A run whose throughput is more than
  ``THROUGHPUT_FACTOR`` times above or below its method's median is flagged (e.g. a machine under load).

The baseline is ``--baseline`` if given, else the method ``none``, else the first method trained without
a regularizer (in a study of presets: the first preset, e.g. ``table3_1_minimal/none``).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from reidreg.metric_keys import TEST, metric_key
from reidreg.per_query import PerQuery
from reidreg.reporting.bootstrap import DEFAULT_SAMPLES, BootstrapResult, DatasetBootstrap
from reidreg.reporting.gather import FINISHED, Run
from reidreg.reporting.methods import settings
from reidreg.reporting.power import DEFAULT_POWER, SeedPlan, describe_plan, plan_seeds
from reidreg.reporting.sequential import SequentialDecision, SequentialDesign, decide, describe_decision
from reidreg.reporting.stats import (
    Difference,
    Summary,
    holm_adjust,
    paired_difference,
    summarize,
    welch_difference,
)
from reidreg.run_dir import RunDir

METRICS = ("mAP", "R1", "mINP")  # shown; test_metrics.json also has R5 and R10
PRIMARY = "mAP"
THROUGHPUT_FACTOR = 1.5


@dataclass
class MetricComparison:
    summary: Summary  # over seeds, in %
    values: dict[str, float]  # per seed (repeats averaged), in %
    difference: Difference | None = None  # None without a baseline (or for the baseline itself)
    p_holm: float | None = None  # primary metric only
    p_sign_flip_holm: float | None = None
    significant: bool | None = None  # primary metric only: Holm p < α
    bootstrap: BootstrapResult | None = None  # primary metric, paired comparisons only
    why_no_bootstrap: str | None = None
    plan: SeedPlan | None = None  # primary metric, paired comparisons only
    sequential: SequentialDecision | None = None  # primary metric, paired, with --sequential only


@dataclass
class Cost:
    """What a method's runs cost, from run.json; None where no run recorded it."""

    img_per_s: float | None  # median over seeds
    ms_per_step: float | None  # median over seeds
    peak_memory_mib: float | None  # largest over seeds
    img_per_s_values: list[float] = field(default_factory=list)  # per run that recorded it
    peak_memory_values: list[float] = field(default_factory=list)
    img_per_s_ratio: float | None = None  # median img/s ÷ the baseline's median img/s
    outliers: list[tuple[Run, float]] = field(default_factory=list)  # throughput off the median

    @classmethod
    def of(cls, runs: list[Run]) -> Cost:
        def recorded(key: str) -> list[tuple[Run, float]]:
            values = [(run, run.performance.get(key)) for run in runs]
            return [(r, float(v)) for r, v in values if isinstance(v, int | float) and math.isfinite(v)]

        speed, step, memory = (
            recorded(key) for key in ("train_img_per_s", "train_ms_per_step", "peak_memory_mib")
        )
        median = float(np.median([v for _, v in speed])) if speed else None
        return cls(
            img_per_s=median,
            ms_per_step=float(np.median([v for _, v in step])) if step else None,
            peak_memory_mib=max(v for _, v in memory) if memory else None,
            img_per_s_values=[v for _, v in speed],
            peak_memory_values=[v for _, v in memory],
            outliers=[
                (run, v)
                for run, v in speed
                if median and not median / THROUGHPUT_FACTOR <= v <= median * THROUGHPUT_FACTOR
            ],
        )


@dataclass
class Row:
    method: str
    dataset: str
    runs: list[Run]  # finished: the ones averaged
    launched: list[Run] = field(default_factory=list)  # every run directory of the method
    is_baseline: bool = False
    baseline: str | None = None  # the method compared with
    metrics: dict[str, MetricComparison] = field(default_factory=dict)
    cost: Cost = field(default_factory=lambda: Cost(None, None, None))
    search: list[str] = field(default_factory=list)  # the options searched, when the row is a search

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]

    def outcomes(self) -> str:
        """``finished/launched``, then how the others ended (``3/5: 1 diverged, 1 failed``)."""
        finished = {id(run) for run in self.runs}
        ended = Counter(
            "no test metrics" if run.status in (None, FINISHED) else run.status
            for run in self.launched
            if id(run) not in finished
        )
        text = f"{len(self.runs)}/{len(self.launched)}"
        return text + (": " + ", ".join(f"{n} {status}" for status, n in ended.items()) if ended else "")


def _seed_key(run: Run) -> str:
    return json.dumps(run.seed)


def _per_seed(runs: list[Run], metric: str) -> dict[str, float]:
    """Seed -> score in % (the mean of the seed's runs if it has several), in order of first appearance."""
    by_seed: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        by_seed[_seed_key(run)].append(100 * float(run.metrics[metric_key(TEST, metric)]))
    return {seed: float(np.mean(values)) for seed, values in by_seed.items()}


def _single_seeds(row: Row) -> list[str]:
    counts = Counter(map(_seed_key, row.runs))
    return [seed for seed, count in counts.items() if count == 1]


def _choose_baseline(rows: list[Row], requested: str | None) -> Row | None:
    rows = [row for row in rows if row.runs]
    if requested is not None:
        return next((row for row in rows if row.method == requested), None)
    return next((row for row in rows if row.method == "none"), None) or next(
        (row for row in rows if all(run.regularizer == "none" for run in row.runs)), None
    )


def build_rows(
    runs: list[Run],
    labels: dict[int, str],
    *,
    baseline: str | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    samples: int = DEFAULT_SAMPLES,
    power: float = DEFAULT_POWER,
    sequential: SequentialDesign | None = None,
) -> tuple[list[Row], list[str]]:
    """The rows (per dataset: baseline first, then methods in order of first appearance) and notes.

    ``runs``: every run, finished or not; ``seed`` and ``samples`` drive the bootstrap; ``power`` sizes
    the seeds-needed plan of each paired comparison; ``sequential`` applies that rule to them.
    """
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        grouped.setdefault((labels[id(run)], run.dataset), []).append(run)
    rows, notes = [], []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        dataset_rows = [
            Row(method, d, [run for run in members if run.finished], members)
            for (method, d), members in grouped.items()
            if d == dataset
        ]
        for row in dataset_rows:
            if not row.runs:
                continue
            for metric in METRICS:
                values = _per_seed(row.runs, metric)
                row.metrics[metric] = MetricComparison(summarize(list(values.values())), values)
            row.cost = Cost.of(row.runs)
            repeated = [seed for seed, count in Counter(map(_seed_key, row.runs)).items() if count > 1]
            if repeated:
                notes.append(
                    f"{row.method} on {dataset}: seed(s) {', '.join(repeated)} run more than once: each "
                    "averaged into one value (counted once) and left out of the pairing"
                )
            notes += [
                f"{row.method} on {dataset}: throughput of `{run.run_dir}` ({value:.1f} img/s) is more than "
                f"{THROUGHPUT_FACTOR}× off the method's median ({row.cost.img_per_s:.1f} img/s)"
                for run, value in row.cost.outliers
            ]
        notes += _mark_searches(dataset_rows)
        reference = _choose_baseline(dataset_rows, baseline)
        if reference is None:
            wanted = f"--baseline {baseline}" if baseline else "a method without regularizer"
            notes.append(f"{dataset}: no baseline ({wanted} has no finished run on it), so no differences")
        else:
            reference.is_baseline = True
            dataset_rows.remove(reference)
            dataset_rows.insert(0, reference)
            notes += _compare(dataset_rows, reference, alpha, seed=seed, samples=samples)
            notes += _plan(dataset_rows, reference, alpha, power=power, sequential=sequential)
        rows += dataset_rows
    return rows, notes


def _compare(rows: list[Row], reference: Row, alpha: float, *, seed: int, samples: int) -> list[str]:
    """Fill every row's differences to ``reference``; returns the notes on the seeds paired."""
    notes = []
    others = [row for row in rows if row is not reference and row.runs]
    base_seeds = _single_seeds(reference)
    if reference.cost.img_per_s:
        for row in rows:
            if row.cost.img_per_s is not None:
                row.cost.img_per_s_ratio = row.cost.img_per_s / reference.cost.img_per_s
    pairs: dict[int, list[str]] = {}
    for row in others:
        row.baseline = reference.method
        mine = _single_seeds(row)
        pairs[id(row)] = [s for s in mine if s in base_seeds]
        unmatched = [f"{s} ({row.method} only)" for s in mine if s not in base_seeds] + [
            f"{s} ({reference.method} only)" for s in base_seeds if s not in mine
        ]
        if unmatched:
            notes.append(
                f"{row.method} vs {reference.method} on {row.dataset}: seed(s) {', '.join(unmatched)} "
                "have no partner, left out of the pairing"
            )
        if len(pairs[id(row)]) < 2:
            notes.append(
                f"{row.method} vs {reference.method} on {row.dataset}: fewer than 2 shared seeds, so the "
                "unpaired Welch test (each seed once)"
            )
        for metric in METRICS:
            comparison, base = row.metrics[metric], reference.metrics[metric]
            common = pairs[id(row)]
            comparison.difference = (
                paired_difference(
                    [comparison.values[s] for s in common], [base.values[s] for s in common], alpha=alpha
                )
                if len(common) >= 2
                else welch_difference(list(comparison.values.values()), list(base.values.values()))
            )
    primary = [row.metrics[PRIMARY] for row in others]
    for comparison, p_holm, p_flip_holm in zip(
        primary,
        holm_adjust([c.difference.p for c in primary]),
        holm_adjust([c.difference.p_sign_flip for c in primary]),
        strict=True,
    ):
        comparison.p_holm, comparison.p_sign_flip_holm = p_holm, p_flip_holm
        comparison.significant = None if p_holm is None else p_holm < alpha
    notes += _bootstrap(others, reference, pairs, seed=seed, samples=samples)
    return notes


def _seed_order(seed_keys: list[str]) -> list[str]:
    """Numeric seeds in increasing order (the order a study adds them), others as they are."""
    values = [json.loads(key) for key in seed_keys]
    if all(isinstance(value, int | float) and not isinstance(value, bool) for value in values):
        return [key for _, key in sorted(zip(values, seed_keys, strict=True))]
    return seed_keys


def _plan(
    rows: list[Row], reference: Row, alpha: float, *, power: float, sequential: SequentialDesign | None
) -> list[str]:
    """The seeds-needed plan (and the sequential decision) of every paired primary comparison, as notes."""
    notes = []
    base = reference.metrics.get(PRIMARY)
    for row in rows:
        comparison = row.metrics.get(PRIMARY)
        if row is reference or comparison is None or comparison.difference.pairs < 2:
            continue
        common = _seed_order([s for s in _single_seeds(row) if s in _single_seeds(reference)])
        differences = [comparison.values[s] - base.values[s] for s in common]
        comparison.plan = plan_seeds(differences, alpha=alpha, power=power)
        text = describe_plan(comparison.plan, metric=PRIMARY, alpha=alpha, power=power)
        if sequential is not None:
            comparison.sequential = decide(sequential, differences)
            text += "; " + describe_decision(comparison.sequential, sequential, have=len(differences))
        notes.append(f"{row.method} vs {reference.method} on {row.dataset}: {text}")
    return notes


def _bootstrap(
    others: list[Row], reference: Row, pairs: dict[int, list[str]], *, seed: int, samples: int
) -> list[str]:
    """Fill the primary metric's bootstrap of every paired row; notes on what could not be resampled."""

    def run_of(row: Row, seed_key: str) -> Run:
        return next(run for run in row.runs if _seed_key(run) == seed_key)

    paired = [row for row in others if len(pairs[id(row)]) >= 2]
    for row in others:
        if row not in paired:
            row.metrics[PRIMARY].why_no_bootstrap = "unpaired"
    runs_of = {
        id(row): ([run_of(row, s) for s in pairs[id(row)]], [run_of(reference, s) for s in pairs[id(row)]])
        for row in paired
    }
    needed = list({id(run): run for mine, base in runs_of.values() for run in mine + base}.values())
    if not needed:
        return []
    files = {id(run): RunDir(run.run_dir).per_query for run in needed}
    lacking = [run for run in needed if not files[id(run)].is_file()]
    usable = [run for run in needed if run not in lacking]
    notes = []
    if lacking:
        notes.append(
            f"{reference.dataset}: {len(lacking)} run(s) have no {files[id(lacking[0])].name} (tested before "
            "reidreg kept per-query results), so no bootstrap for their comparisons: "
            + ", ".join(f"`{run.run_dir}`" for run in lacking[:5])
            + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        )
    try:
        resampler = (
            DatasetBootstrap(
                [PerQuery.load(files[id(run)]) for run in usable],
                dataset=reference.dataset,
                seed=seed,
                samples=samples,
            )
            if usable
            else None
        )
    except ValueError as error:
        notes.append(f"{reference.dataset}: no bootstrap: {error}")
        resampler = None
    column = {id(run): index for index, run in enumerate(usable)}
    for row in paired:
        comparison = row.metrics[PRIMARY]
        method_runs, base_runs = runs_of[id(row)]
        if resampler is None or any(id(run) not in column for run in method_runs + base_runs):
            comparison.why_no_bootstrap = "no per-query results"
            continue
        comparison.bootstrap = resampler.compare(
            [column[id(run)] for run in method_runs], [column[id(run)] for run in base_runs], name=row.method
        )
    return notes


def _mark_searches(rows: list[Row]) -> list[str]:
    """Mark rows that differ only in numeric options of the same regularizer (and experiment) as a search."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.launched[0].regularizer, row.launched[0].experiment)].append(row)
    notes = []
    for (regularizer, _), members in groups.items():
        if len(members) < 2:
            continue
        runs = [run for row in members for run in row.launched]
        flats = iter(settings(runs))
        constant: list[dict[str, str]] = []  # per row: the settings all its runs share
        for row in members:
            row_flats = [next(flats) for _ in row.launched]
            constant.append({k: v for k, v in row_flats[0].items() if all(f.get(k) == v for f in row_flats)})
        keys = set().union(*constant)
        differing = sorted(k for k in keys if len({c.get(k) for c in constant}) > 1)
        numeric = all(
            key.startswith("regularizer.") and all(_is_number(c.get(key)) for c in constant)
            for key in differing
        )
        if differing and numeric:
            searched = [key.removeprefix("regularizer.") for key in differing]
            for row in members:
                row.search = searched
            notes.append(
                f"{members[0].dataset}: the {len(members)} {regularizer} rows are a search over "
                f"{', '.join(searched)}: the best of them by its test score overstates it; select on the "
                "validation score (val/best_mAP) and confirm the chosen value with new seeds"
            )
    return notes


def _is_number(value: str | None) -> bool:
    parsed = None if value is None else json.loads(value)
    return isinstance(parsed, int | float) and not isinstance(parsed, bool)
