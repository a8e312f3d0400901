"""``--plan``: the seeds to add to a study, per method, and the ``reidreg.train`` multirun that adds them.

Each paired comparison's figure comes from ``reidreg.reporting.power`` (or, with ``--sequential``, one seed
per comparison the rule says to continue). A new seed must be run by the method *and* its baseline to make
a pair, so the baseline gets as many new seeds as its most demanding comparison. New seeds are integers no
run of the study used (whatever its status), so no finished job is run again; the command repeats the
method's own overrides (``.hydra/overrides.yaml``) and study file, with only ``seed=`` replaced.
"""

from __future__ import annotations

import json
import shlex

from reidreg.reporting.gather import Run
from reidreg.reporting.sequential import CONTINUE
from reidreg.reporting.table import PRIMARY, Row


def seeds_to_add(row: Row) -> int:
    """New pairs this comparison asks for: one per sequential look, else what its power plan needs."""
    comparison = row.metrics.get(PRIMARY)
    if comparison is None or comparison.plan is None:
        return 0
    if comparison.sequential is not None:
        return int(comparison.sequential.outcome == CONTINUE)
    return comparison.plan.to_add


def unused_seeds(runs: list[Run], count: int) -> list[int]:
    """The ``count`` smallest non-negative integers no run used as its seed."""
    used = {json.dumps(run.seed) for run in runs}
    seeds, candidate = [], 0
    while len(seeds) < count:
        if json.dumps(candidate) not in used:
            seeds.append(candidate)
        candidate += 1
    return seeds


def _consecutive(seeds: list[int]) -> bool:
    """Three or more seeds that follow each other: written as a range, not a list of hundreds."""
    return len(seeds) >= 3 and seeds == list(range(seeds[0], seeds[0] + len(seeds)))


def seed_sweep(seeds: list[int]) -> str:
    """The ``seed=`` override sweeping ``seeds``: Hydra's ``range(first,stop)`` for consecutive ones."""
    if _consecutive(seeds):
        return f"seed=range({seeds[0]},{seeds[-1] + 1})"
    return "seed=" + ",".join(map(str, seeds))


def seed_list(seeds: list[int]) -> str:
    """``seeds`` in words: ``3–157`` for consecutive ones, else ``3, 5, 6``."""
    return f"{seeds[0]}–{seeds[-1]}" if _consecutive(seeds) else ", ".join(map(str, seeds))


def train_command(row: Row, seeds: list[int]) -> str:
    """``python -m reidreg.train -m <the method's launch options and overrides> seed=<seeds>``, quoted for
    the shell it is pasted into (``range(a,b)`` and ``[a,b]`` are bash syntax unquoted)."""
    run = row.launched[0]
    overrides = [o for o in run.overrides if not o.lstrip("+~").startswith(("seed=", "hydra."))]
    if not run.overrides:
        overrides = [f"regularizer={run.regularizer}"]  # not launched by Hydra: only the regularizer is known
    return shlex.join(["python", "-m", "reidreg.train", "-m", *run.launch, *overrides, seed_sweep(seeds)])


def plan_section(rows: list[Row], runs: list[Run]) -> str:
    """The ``## Plan`` section of the report: per dataset, the seeds to add per method and the commands."""
    lines = ["\n## Plan: seeds to add\n"]
    for dataset in dict.fromkeys(row.dataset for row in rows):
        members = [row for row in rows if row.dataset == dataset]
        reference = next((row for row in members if row.is_baseline), None)
        wanted = {id(row): seeds_to_add(row) for row in members if not row.is_baseline}
        if reference is None or not any(wanted.values()):
            lines.append(f"- {dataset}: no seeds to add (see the notes for each comparison's figure)")
            continue
        new = unused_seeds(runs, max(wanted.values()))
        for row in members:  # the baseline first, as build_rows orders them
            count = len(new) if row is reference else wanted.get(id(row), 0)
            if not count:
                continue
            role = "baseline, to pair with every new seed" if row is reference else f"vs {row.baseline}"
            lines.append(f"- {row.method} on {dataset} ({role}): {count} seed(s), {seed_list(new[:count])}")
            lines.append(f"  `{train_command(row, new[:count])}`")
    lines.append(
        "\nEach command starts a new multirun; report it together with this study "
        "(`python -m reidreg.report <this study> <the new multirun>`)."
    )
    return "\n".join(lines)
