"""Do the runs of a comparison come from one environment? Read from every run's ``run.json`` provenance.

A run is deterministic only within one environment: another torch, CUDA, GPU, precision or code version
shifts the mAP by about as much as the regularizers differ (README quickstart: 59.97 % vs 59.14 % under
two torch versions). The report therefore compares, among the runs it averages on one dataset, every field
of ``FIELDS`` — software versions, the git commit and uncommitted changes, precision and numerics, the
device, and the dataset's identity — and warns about each that differs, with the runs that hold each
value. Fields whose values split the runs in the same groups are named together in one warning.

Not compared: the host name, CPU and command line (they differ between the jobs of any cluster study
without changing results), the seed, and the dataset's validation hold-out (both differ between seeds by
design; a different hold-out *setting* is a config difference, reported by ``comparability_notes``).
Runs without provenance (made before ``run.json`` existed) cannot be compared; ``without_provenance``
lists them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reidreg.reporting.gather import Run

UNKNOWN = "unknown"
MAX_RUNS_LISTED = 6


def _plain(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _commit(git: Mapping[str, Any] | None) -> str:
    return "not a git checkout" if git is None else _plain(git.get("commit"))[:12]


def _changes(git: Mapping[str, Any] | None) -> str:
    if git is None:
        return "not a git checkout"
    if git.get("dirty") is None:
        return UNKNOWN
    return f"yes (changes {str(git.get('diff_sha256'))[:12]})" if git["dirty"] else "no"


def _splits(splits: Mapping[str, Mapping[str, int]]) -> str:
    return ", ".join(
        f"{name} {counts.get('images')} images/{counts.get('ids')} ids" for name, counts in splits.items()
    )


def _options(options: Mapping[str, Any] | None) -> str:
    return "none" if options is None else ", ".join(f"{key}={value}" for key, value in options.items())


@dataclass(frozen=True)
class Field:
    """One compared entry of the provenance: its name in the report, where it is, how it is shown."""

    label: str
    path: tuple[str, ...]
    show: Callable[[Any], str] = _plain


FIELDS = (
    Field("torch", ("versions", "torch")),
    Field("CUDA", ("versions", "cuda")),
    Field("cuDNN", ("versions", "cudnn")),
    Field("Lightning", ("versions", "lightning")),
    Field("timm", ("versions", "timm")),
    Field("torchvision", ("versions", "torchvision")),
    Field("numpy", ("versions", "numpy")),
    Field("Python", ("versions", "python")),
    Field("reidreg version", ("versions", "reidreg")),
    Field("git commit", ("git",), _commit),
    Field("uncommitted changes", ("git",), _changes),
    Field("precision", ("precision",)),
    Field("float32 matmul precision", ("numerics", "float32_matmul_precision")),
    Field("TF32 matmul", ("numerics", "cuda_matmul_allow_tf32")),
    Field("cuDNN TF32", ("numerics", "cudnn_allow_tf32")),
    Field("deterministic algorithms", ("numerics", "deterministic_algorithms")),
    Field("cuDNN benchmark", ("numerics", "cudnn_benchmark")),
    Field("device type", ("device", "type")),
    Field("device model", ("device", "model")),
    Field("device count", ("device", "count")),
    Field("dataset name", ("dataset", "name")),
    Field("dataset splits", ("dataset", "splits"), _splits),
    Field("dataset files (listing SHA-256)", ("dataset", "listing_sha256"), lambda sha: _plain(sha)[:12]),
    Field("synthetic generator", ("dataset", "synthetic"), _options),
)
DATASET_FIELDS = frozenset(field.label for field in FIELDS if field.path[0] == "dataset")


def value_of(provenance: Mapping[str, Any], field: Field) -> str:
    """The field's value as shown in the report; ``unknown`` when the provenance does not have it."""
    node: Any = provenance
    for key in field.path:
        if not isinstance(node, Mapping) or key not in node:
            return UNKNOWN
        node = node[key]
    return field.show(node)


def without_provenance(runs: list[Run]) -> list[Run]:
    return [run for run in runs if not run.provenance]


def _partition(values: list[str]) -> tuple[int, ...]:
    """Runs grouped by value, as the group number of each run (numbered in order of first appearance)."""
    numbers: dict[str, int] = {}
    return tuple(numbers.setdefault(value, len(numbers)) for value in values)


def _runs_text(runs: list[Run], describe: Callable[[Run], str]) -> str:
    shown = [describe(run) for run in runs[:MAX_RUNS_LISTED]]
    if len(runs) > MAX_RUNS_LISTED:
        shown.append(f"and {len(runs) - MAX_RUNS_LISTED} more")
    return f"{len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(shown)}"


def environment_differences(runs: list[Run], describe: Callable[[Run], str]) -> list[str]:
    """One warning per group of fields that differ between the runs of one dataset (with provenance).

    ``describe(run)`` names a run in the warning. Example: ``synthetic: runs differ in precision:
    32-true (3 runs: ...); bf16-mixed (2 runs: ...)``.
    """
    warnings = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [run for run in runs if run.dataset == dataset and run.provenance]
        by_partition: dict[tuple[int, ...], list[tuple[Field, list[str]]]] = {}
        for field in FIELDS:
            values = [value_of(run.provenance, field) for run in members]
            if len(set(values)) > 1:
                by_partition.setdefault(_partition(values), []).append((field, values))
        for partition, fields in by_partition.items():
            groups = []
            for group in dict.fromkeys(partition):
                indices = [index for index, number in enumerate(partition) if number == group]
                shown = ", ".join(
                    values[indices[0]] if len(fields) == 1 else f"{field.label} {values[indices[0]]}"
                    for field, values in fields
                )
                groups.append(f"{shown} ({_runs_text([members[i] for i in indices], describe)})")
            labels = ", ".join(field.label for field, _ in fields)
            warnings.append(f"{dataset}: runs differ in {labels}: " + "; ".join(groups))
    return warnings


def shared_environment(runs: list[Run]) -> str | None:
    """The software, code, numerics and device all runs with provenance share (differences are warned
    about separately), as one line; None when no run has provenance."""
    members = [run for run in runs if run.provenance]
    if not members:
        return None
    shared = []
    for field in FIELDS:
        if field.label in DATASET_FIELDS:
            continue
        values = {value_of(run.provenance, field) for run in members}
        if len(values) == 1 and (value := values.pop()) != UNKNOWN:
            shared.append(f"{field.label} {value}")
    return ", ".join(shared) if shared else None
