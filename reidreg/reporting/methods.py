"""Which runs are repeats of one method: the "method" column of the report.

A method is what a run trains, apart from its seed. Its name is built from the runs themselves:

1. the regularizer name (``none``, ``adaptive_l2``, ``adaptive_l2+sgsl``, see ``regularizer_name``);
2. prefixed with the experiment preset (``table3_6_l2/constant_l2``) when the runs do not all use the
   same one, as in the Table III ablation, whose rows are presets;
3. followed by every other setting that still differs between runs of the same name on the same dataset
   (``constant_l2 constant_l2.lam=0.001`` in a search of λ), so that runs with different settings are
   never averaged together as if they were seeds.

Settings that do not change what is trained are ignored: the seed and every value that always equals it
(e.g. ``data.seed: ${seed}``), and every operational option (``reidreg.experiment``, the definition resume
uses too: paths, loggers, progress display, loader workers, checkpoint cadence, ...), so that a run with
another ``progress.throughput_warmup_steps`` is one more seed of the same method, not a method of its own.
Settings that differ *between* methods on one dataset beyond their regularizer (or preset) are not part of
the name but are reported by ``comparability_notes``: a table is only a fair comparison if those are
intended.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from reidreg.experiment import method_settings
from reidreg.reporting.gather import Run
from reidreg.utils.config import flatten

UNSET = "unset"  # shown for a key that a run's config does not have


def flatten_as_json(config: dict[str, Any]) -> dict[str, str]:
    """Dotted key -> value as JSON, so that lists and dicts compare and print."""
    return {key: json.dumps(value, sort_keys=True) for key, value in flatten(config).items()}


def _seed_derived_keys(runs: list[Run], flats: list[dict[str, str]]) -> set[str]:
    """Keys whose value equals the run's seed in every run that has them (only detectable across seeds)."""
    if len({json.dumps(run.seed) for run in runs}) < 2:
        return set()
    candidates = set().union(*flats)
    return {
        key
        for key in candidates
        if all(
            flat[key] == json.dumps(run.seed) for run, flat in zip(runs, flats, strict=True) if key in flat
        )
    }


def settings(runs: list[Run]) -> list[dict[str, str]]:
    """Every run's flattened config without the keys that do not change what is trained."""
    flats = [flatten_as_json(run.config) for run in runs]
    seed_derived = _seed_derived_keys(runs, flats)
    return [method_settings(flat, seed_derived) for flat in flats]


def _varying(flats: Iterable[dict[str, str]]) -> set[str]:
    flats = list(flats)
    keys = set().union(*flats) if flats else set()
    return {key for key in keys if len({flat.get(key) for flat in flats}) > 1}


def _short(key: str) -> str:
    return key.removeprefix("regularizer.")


def _bases(runs: list[Run]) -> list[str]:
    """Regularizer name, prefixed by the experiment preset when the runs do not share one."""
    by_experiment = len({run.experiment for run in runs}) > 1
    return [f"{run.experiment}/{run.regularizer}" if by_experiment else run.regularizer for run in runs]


def _split_keys(runs: list[Run], flats: list[dict[str, str]], bases: list[str]) -> dict[str, list[str]]:
    """Per base name: the settings that differ between its runs on one dataset (rule 3)."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for run, base, flat in zip(runs, bases, flats, strict=True):
        groups[(base, run.dataset)].append(flat)
    split: dict[str, set[str]] = defaultdict(set)
    for (base, _), members in groups.items():
        split[base] |= _varying(members)
    return {base: sorted(keys) for base, keys in split.items()}


def method_labels(runs: list[Run]) -> dict[int, str]:
    """``id(run)`` -> method name for every run (rules in the module docstring)."""
    flats, bases = settings(runs), _bases(runs)
    split = _split_keys(runs, flats, bases)
    labels = {}
    for run, base, flat in zip(runs, bases, flats, strict=True):
        extra = [f"{_short(key)}={json.loads(flat[key]) if key in flat else UNSET}" for key in split[base]]
        labels[id(run)] = " ".join([base, *extra])
    return labels


def comparability_notes(runs: list[Run], labels: dict[int, str]) -> list[str]:
    """Differences between the methods on one dataset beyond what their names say.

    Two kinds: a setting outside ``regularizer`` that is constant within each method but differs between
    methods of the same experiment preset (unless a name shows it already), and runs that stopped at
    different epochs (e.g. one that ended early).
    """
    flats = settings(runs)
    in_names = {key for keys in _split_keys(runs, flats, _bases(runs)).values() for key in keys}
    notes = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [(run, flat) for run, flat in zip(runs, flats, strict=True) if run.dataset == dataset]
        for experiment in dict.fromkeys(run.experiment for run, _ in members):
            by_label: dict[str, list[dict[str, str]]] = defaultdict(list)
            for run, flat in members:
                if run.experiment == experiment:
                    by_label[labels[id(run)]].append(flat)
            for key in sorted(_varying(flat for group in by_label.values() for flat in group) - in_names):
                if key == "regularizer" or key.startswith("regularizer."):  # the method itself
                    continue
                values = {
                    label: {flat.get(key, UNSET) for flat in group} for label, group in by_label.items()
                }
                if all(len(v) == 1 for v in values.values()):  # else it varies within a method: in its name
                    shown = ", ".join(f"{label}: {next(iter(v))}" for label, v in values.items())
                    notes.append(f"{dataset}: methods differ in {key} ({shown})")
        epochs: dict[str, set[int | None]] = defaultdict(set)
        for run, _ in members:
            epochs[labels[id(run)]].add(run.last_epoch())
        if len(set().union(*epochs.values())) > 1:
            shown = ", ".join(f"{label}: {sorted(e, key=str)}" for label, e in epochs.items())
            notes.append(
                f"{dataset}: runs stopped at different epochs (last epoch in csv/metrics.csv: {shown})"
            )
    return notes
