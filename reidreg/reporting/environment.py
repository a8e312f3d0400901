"""Do the runs of a comparison come from one environment? Read from every run's ``run.json`` provenance.

A run is deterministic only within one environment: another torch, CUDA, GPU, precision or code version
shifts the mAP by about as much as the regularizers differ (README quickstart: 59.97 % vs 59.14 % under
two torch versions). Two kinds of difference are told apart, among the finished runs of one dataset:

* ``MIXING_FIELDS`` change what is measured: the dataset's content (SHA-256 of the image bytes, from the
  image check), its file listing, the held-out validation identities of runs that share a seed, the
  precision and the device class (CPU, or the GPU model). ``mixed_runs`` names each such difference with
  the runs on each side, and ``python -m reidreg.report`` refuses the comparison unless ``--allow-mixed``
  is given. A run that did not record a field (made before it existed) is not compared on it.
* ``FIELDS`` — software versions, the git commit and uncommitted changes, numerics, the device's count and
  model, the dataset's splits and generator options — are warned about, each with the runs that hold each
  value. Fields whose values split the runs in the same groups are named together in one warning.

Not compared: the host name, CPU and command line (they differ between the jobs of any cluster study
without changing results), the seed (repeated or unmatched seeds are the statistics' concern), and the
held-out identities of different seeds (they differ by design; a different hold-out *setting* is a config
difference, reported by ``comparability_notes``). Runs without provenance (made before ``run.json``
existed) cannot be compared; ``without_provenance`` lists them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
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
    return f"yes (patch {str(git.get('patch_sha256'))[:12]})" if git["dirty"] else "no"


def _splits(splits: Mapping[str, Mapping[str, int]]) -> str:
    return ", ".join(
        f"{name} {counts.get('images')} images/{counts.get('ids')} ids" for name, counts in splits.items()
    )


def _short_hash(sha: Any) -> str:
    return _plain(sha)[:12]


def _device_class(device: Mapping[str, Any]) -> str:
    """``cpu`` for any CPU (their numbers agree closely), else the device type and model (``cuda NVIDIA
    H100 80GB HBM3``): another GPU model runs other kernels."""
    if device.get("type") == "cpu":
        return "cpu"
    return f"{device.get('type')} {device.get('model')}"


def _packages(packages: list[str]) -> str:
    digest = hashlib.sha256("\n".join(packages).encode()).hexdigest()
    return f"{len(packages)} (list SHA-256 {digest[:12]})"


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
    Field("installed packages", ("packages",), _packages),
    Field("float32 matmul precision", ("numerics", "float32_matmul_precision")),
    Field("TF32 matmul", ("numerics", "cuda_matmul_allow_tf32")),
    Field("cuDNN TF32", ("numerics", "cudnn_allow_tf32")),
    Field("deterministic algorithms", ("numerics", "deterministic_algorithms")),
    Field("cuDNN benchmark", ("numerics", "cudnn_benchmark")),
    Field("device model", ("device", "model")),
    Field("device count", ("device", "count")),
    Field("dataset name", ("dataset", "name")),
    Field("dataset splits", ("dataset", "splits"), _splits),
    Field("synthetic generator", ("dataset", "synthetic"), _options),
)
MIXING_FIELDS = (
    Field("dataset content (image bytes SHA-256)", ("dataset", "content_hash"), _short_hash),
    Field("dataset files (listing SHA-256)", ("dataset", "listing_sha256"), _short_hash),
    Field("precision", ("precision",)),
    Field("device class", ("device",), _device_class),
)
DATASET_FIELDS = frozenset(field.label for field in (*FIELDS, *MIXING_FIELDS) if field.path[0] == "dataset")
HELD_OUT = Field("held-out validation identities (SHA-256)", ("dataset", "held_out_ids_sha256"), _short_hash)


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


def _differences(
    where: str, members: list[Run], fields: tuple[Field, ...], describe: Callable[[Run], str]
) -> list[str]:
    """One line per group of ``fields`` that split ``members`` alike: ``<where>: runs differ in ...``."""
    lines = []
    by_partition: dict[tuple[int, ...], list[tuple[Field, list[str]]]] = {}
    for field in fields:
        values = [value_of(run.provenance, field) for run in members]
        if len(set(values)) > 1:
            by_partition.setdefault(_partition(values), []).append((field, values))
    for partition, differing in by_partition.items():
        groups = []
        for group in dict.fromkeys(partition):
            indices = [index for index, number in enumerate(partition) if number == group]
            shown = ", ".join(
                values[indices[0]] if len(differing) == 1 else f"{field.label} {values[indices[0]]}"
                for field, values in differing
            )
            groups.append(f"{shown} ({_runs_text([members[i] for i in indices], describe)})")
        labels = ", ".join(field.label for field, _ in differing)
        lines.append(f"{where}: runs differ in {labels}: " + "; ".join(groups))
    return lines


def environment_differences(runs: list[Run], describe: Callable[[Run], str]) -> list[str]:
    """One warning per group of ``FIELDS`` that differ between the runs of one dataset (with provenance).

    ``describe(run)`` names a run in the warning. Example: ``synthetic: runs differ in torch: 2.5.0
    (3 runs: ...); 2.14.1 (2 runs: ...)``.
    """
    warnings = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [run for run in runs if run.dataset == dataset and run.provenance]
        warnings += _differences(dataset, members, FIELDS, describe)
    return warnings


def mixed_runs(runs: list[Run], describe: Callable[[Run], str]) -> list[str]:
    """The differences in ``MIXING_FIELDS`` (and in the held-out identities of one seed) between the runs
    of one dataset, one line each; runs that did not record a field are not compared on it."""
    lines = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [run for run in runs if run.dataset == dataset and run.provenance]
        for field in MIXING_FIELDS:
            known = [run for run in members if value_of(run.provenance, field) not in (UNKNOWN, "none")]
            lines += _differences(dataset, known, (field,), describe)
        by_seed: dict[str, list[Run]] = defaultdict(list)
        for run in members:
            if value_of(run.provenance, HELD_OUT) not in (UNKNOWN, "none"):
                by_seed[_plain(run.seed)].append(run)
        for seed, same_seed in by_seed.items():
            lines += _differences(f"{dataset}, seed {seed}", same_seed, (HELD_OUT,), describe)
    return lines


def mixing_refusal(lines: list[str]) -> str:
    """The one message ``python -m reidreg.report`` stops with when ``mixed_runs`` found differences."""
    return (
        "refusing to compare runs that measured different things ("
        + " | ".join(lines)
        + "). Report them separately, or pass --allow-mixed to compare them anyway (the report then says "
        "so above the table)."
    )


def shared_environment(runs: list[Run]) -> str | None:
    """The software, code, precision, numerics and device all runs with provenance share (differences are
    refused or warned about separately), as one line; None when no run has provenance."""
    members = [run for run in runs if run.provenance]
    if not members:
        return None
    shared = []
    for field in (*FIELDS, *MIXING_FIELDS):
        if field.label in DATASET_FIELDS:
            continue
        values = {value_of(run.provenance, field) for run in members}
        if len(values) == 1 and (value := values.pop()) != UNKNOWN:
            shared.append(f"{field.label} {value}")
    return ", ".join(shared) if shared else None
