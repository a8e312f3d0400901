"""Every option of a composed config checked before any work: one error that lists every problem.

``validate_train_config(cfg)`` / ``validate_evaluate_config(cfg)`` check the values of the composed
config of ``python -m reidreg.train`` / ``python -m reidreg.evaluate`` against the tables below, one line
per option: ``"dotted.key": rule``. A rule knows what it accepts and says what is allowed, e.g.
``integer(min=1)`` → "an integer >= 1". Problems are collected, then raised together as one
``ConfigError`` with one line per problem: ``data.num_identities='eight': expected an integer >= 1``.
A key missing from the config is skipped (Hydra's defaults always hold it unless removed with ``~key``;
unknown keys are refused by Hydra's struct mode). A few rules relate options (``freeze_backbone_epochs``
below ``trainer.max_epochs``, the triplet loss's P and K, the regional stripes and the image height); they
run only when the options they read passed their own rules.

Each regularizer validates its own options in its constructor (adding one never touches this file); here
only the group's shape is checked: every ``regularizer.<name>`` is a node with a ``_target_``.

This module imports only omegaconf and the standard library (the synthetic dataset's option check imports
numpy and PIL, never torch, Lightning or timm): it runs right after composition, before any heavy import.

Folders (``check_output_dir``, ``check_data_dir``, ``check_train_paths``, ``check_evaluate_paths``): the
output folder must be creatable and writable with at least ``MIN_FREE_OUTPUT_BYTES`` free; the data folder
must be readable, and writable with ``MIN_FREE_DATA_BYTES`` free where the synthetic dataset is still to be
generated there. The probes leave nothing behind (a probe file is created and removed at once).

``ValidateBeforeRun`` is a Hydra callback that runs all of this before Hydra creates the run folder, so a
bad command line leaves no folder behind and prints one ``error: ...`` block (exit status 2).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from reidreg.errors import ConfigError

GIB = 1024**3
MIB = 1024**2
# Free space below which a run is refused: a guard against a full disk, not a budget. A paper-recipe
# checkpoint (ResNet-50 + regional branches + Adam's state) takes 0.89 GiB on Market-1501 (751 classes),
# 1.04 GiB on MSMT17, and a run keeps two (last, best). The default synthetic dataset takes 14 MB.
MIN_FREE_OUTPUT_BYTES = 1 * GIB
MIN_FREE_DATA_BYTES = 100 * MIB

_ABSENT = object()


# ----------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What an option accepts (``accepts(value)``) and, in words, what is allowed (``expected``)."""

    accepts: Callable[[Any], bool]
    expected: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(gt: Any = None, ge: Any = None, lt: Any = None, le: Any = None) -> str:
    low = (f"({gt}" if gt is not None else f"[{ge}") if gt is not None or ge is not None else None
    high = (f"{lt})" if lt is not None else f"{le}]") if lt is not None or le is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" > {gt}" if gt is not None else f" >= {ge}"
    if high:
        return f" < {lt}" if lt is not None else f" <= {le}"
    return ""


def _in_range(value: Any, gt: Any = None, ge: Any = None, lt: Any = None, le: Any = None) -> bool:
    return (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    )


def integer(*, min: int | None = None, max: int | None = None) -> Rule:  # noqa: A002 (reads as the rule)
    """An int (not a bool, not 4.0) in [min, max]."""
    return Rule(
        lambda value: _is_int(value) and _in_range(value, ge=min, le=max),
        f"an integer{_range_text(ge=min, le=max)}",
    )


def number(
    *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Rule:
    """A finite int or float (not a bool) in the given range."""
    return Rule(
        lambda value: _is_number(value) and _in_range(value, gt=gt, ge=ge, lt=lt, le=le),
        f"a number{_range_text(gt=gt, ge=ge, lt=lt, le=le)}",
    )


def boolean() -> Rule:
    return Rule(lambda value: isinstance(value, bool), "true or false")


def string() -> Rule:
    return Rule(lambda value: isinstance(value, str) and value.strip() != "", "a non-empty string")


def choice(*values: Any) -> Rule:
    """One of ``values``, of the same type (``32`` and ``"32"`` are different entries; ``false`` is not 0)."""
    return Rule(
        lambda value: any(type(value) is type(allowed) and value == allowed for allowed in values),
        "one of " + ", ".join(dict.fromkeys(str(v) for v in values)),
    )


def optional(rule: Rule) -> Rule:
    """null or what ``rule`` accepts."""
    return Rule(lambda value: value is None or rule.accepts(value), f"null or {rule.expected}")


def any_of(*rules: Rule, expected: str | None = None) -> Rule:
    """What any of ``rules`` accepts; ``expected`` replaces the joined descriptions."""
    return Rule(
        lambda value: any(rule.accepts(value) for rule in rules),
        expected or " or ".join(rule.expected for rule in rules),
    )


def list_of(item: Rule, *, length: int | None = None, increasing: bool = False) -> Rule:
    """A list of items that ``item`` accepts; of ``length`` items; strictly increasing."""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, list | tuple)
            and all(item.accepts(v) for v in value)
            and (length is None or len(value) == length)
            and (not increasing or all(a < b for a, b in zip(value, value[1:], strict=False)))
        )

    size = f"{length} " if length is not None else ""
    order = "strictly increasing " if increasing else ""
    return Rule(accepts, f"a list of {size}{order}items, each {item.expected}")


def mapping() -> Rule:
    return Rule(lambda value: isinstance(value, Mapping), "a mapping (key: value)")


# ----------------------------------------------------------------------------------------- the tables
# What Lightning 2.6's Trainer accepts (tests/test_validation.py compares with Lightning's own lists),
# plus ``auto`` (bf16-mixed on GPUs that support it, 32 elsewhere).
PRECISIONS = (
    "auto", 32, "32", "32-true", 16, "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
    64, "64", "64-true", "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = (
    "auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "ddp_fork",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true", "ddp_notebook",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true", "ddp_spawn",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "deepspeed",
    "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
    "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload",
    "single_device", "single_tpu", "single_xla", "xla", "xla_debug",
)  # fmt: skip
DATASETS = ("market1501", "dukemtmc", "msmt17", "synthetic")
METRICS = ("cosine", "euclidean")
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")  # checkpoint.signals
# reidreg.training.module.REPORTED_METRICS on the validation hold-out; "best" is their maximum.
MONITORED = ("val/mAP", "val/R1", "val/R5", "val/R10", "val/mINP")
SEED = integer(min=0, max=2**32 - 1)  # numpy's and Lightning's seed range
PROBABILITY = number(ge=0, le=1)
DEVICES = any_of(
    choice("auto", -1),
    integer(min=1),
    list_of(integer(min=0)),
    Rule(lambda v: isinstance(v, str) and all(p.strip().isdigit() for p in v.split(",")), ""),
    expected="auto, -1 (all), a count >= 1, a list of device indices or a string such as '0,1'",
)

TRAIN_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "seed": SEED,
    "ckpt_path": optional(string()),
    "test": boolean(),
    "freeze_backbone_epochs": integer(min=0),  # and < trainer.max_epochs (_related_train_problems)
    # dataset
    "dataset.name": choice(*DATASETS),
    "dataset.options": mapping(),
    "dataset.options.combine_val": boolean(),
    # data
    "data._target_": string(),
    "data.height": integer(min=1),
    "data.width": integer(min=1),
    "data.hflip": boolean(),
    "data.pad_crop": boolean(),
    "data.padding": integer(min=0),
    "data.random_erasing": boolean(),
    "data.random_erasing_prob": PROBABILITY,
    "data.num_identities": integer(min=1),
    "data.num_instances": integer(min=1),
    "data.steps_per_epoch": optional(integer(min=1)),
    "data.skip_small_identities": boolean(),
    "data.val_identities": any_of(
        integer(min=0),
        number(gt=0, lt=1),
        expected="0 (no hold-out), a count of identities >= 1 or a fraction in (0, 1)",
    ),
    "data.batch_size_test": integer(min=1),
    "data.num_workers": integer(min=0),
    "data.verify_images": boolean(),
    "data.pipeline": choice("auto", "cpu", "gpu"),
    # backbone and model
    "backbone._target_": string(),
    "backbone.name": string(),
    "backbone.pretrained": boolean(),
    "backbone.weights_file": optional(string()),
    "backbone.allow_download": boolean(),
    "backbone.last_stride_one": boolean(),
    "backbone.rbr": boolean(),
    "model._target_": string(),
    "model.regional_branches": boolean(),
    "model.num_stripes": integer(min=1),
    "model.stripe_channels": integer(min=1),
    "model.clip": boolean(),
    "model.compile": boolean(),
    # loss
    "loss._target_": string(),
    "loss.label_smoothing": number(ge=0, lt=1),
    "loss.triplet": boolean(),
    "loss.triplet_margin": optional(number(gt=0)),
    "loss.ce_weight": number(ge=0),
    "loss.triplet_weight": number(ge=0),
    # optimisation
    "optim.optimizer._target_": string(),
    "optim.optimizer.lr": number(gt=0),
    "optim.optimizer.betas": list_of(number(ge=0, lt=1), length=2),
    "optim.optimizer.momentum": number(ge=0, lt=1),
    "optim.optimizer.weight_decay": number(ge=0),
    "optim.schedule.warmup_epochs": integer(min=0),
    "optim.schedule.warmup_start_lr": number(ge=0),
    "optim.schedule.milestones": list_of(integer(min=0), increasing=True),
    "optim.schedule.gamma": number(gt=0, le=1),
    "optim.schedule.min_lr": number(ge=0),
    # trainer
    "trainer._target_": string(),
    "trainer.max_epochs": integer(min=1),
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.devices": DEVICES,
    "trainer.strategy": choice(*STRATEGIES),
    "trainer.num_nodes": integer(min=1),
    "trainer.precision": choice(*PRECISIONS),
    "trainer.check_val_every_n_epoch": integer(min=1),
    "trainer.log_every_n_steps": integer(min=1),
    "trainer.num_sanity_val_steps": integer(min=-1),
    "trainer.fast_dev_run": any_of(boolean(), integer(min=0)),
    "trainer.deterministic": any_of(boolean(), choice("warn")),
    "trainer.use_distributed_sampler": boolean(),
    "trainer.sync_batchnorm": boolean(),
    "trainer.enable_model_summary": boolean(),
    # evaluation, checkpoints, run supervision
    "evaluation.metric": choice(*METRICS),
    "evaluation.flip": boolean(),
    "evaluation.rerank": boolean(),
    "checkpoint.monitor": choice(*MONITORED),
    "checkpoint.every_n_steps": integer(min=0),
    "checkpoint.signals": list_of(choice(*SIGNALS)),
    "checkpoint.requeue": boolean(),
    "divergence.factor": number(gt=1),
    "divergence.reference_steps": integer(min=1),
    "divergence.check_every_n_steps": integer(min=1),
    "progress.mode": choice("auto", "bar", "lines", "off"),
    "progress.every_n_steps": integer(min=1),
    "progress.every_n_seconds": optional(number(gt=0)),
    "progress.throughput_warmup_steps": integer(min=0),
}

EVALUATE_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "ckpt_path": string(),
    "metric": choice(*METRICS),
    "flip": boolean(),
    "rerank": boolean(),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "device": choice("auto", "cpu", "cuda"),
    "seed": SEED,
    "ranked_list.num_queries": integer(min=0),
    "ranked_list.top_k": integer(min=1),
    "ranked_list.seed": SEED,
    "dataset": optional(mapping()),
    "dataset.name": choice(*DATASETS),
    "dataset.options": mapping(),
    "dataset.options.combine_val": boolean(),
    "attack": optional(mapping()),
    "attack.name": choice("fgsm", "pgd"),
    "attack.eps": number(ge=0, le=1),  # L-inf radius in [0, 1] pixel space
    "attack.step_size": optional(number(gt=0, le=1)),
    "attack.steps": optional(integer(min=1)),
    "attack.random_start": boolean(),
}


# ------------------------------------------------------------------------------------------ validation
def show(value: Any) -> str:
    """A value as the user would type it: null, true, 'text', -0.001, [40, 70]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass(frozen=True)
class _Problem:
    message: str


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved plain value at ``key``, ``_ABSENT``, or a ``_Problem`` (missing, unresolvable)."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        return _Problem(f"{key}=???: missing; give it on the command line ({key}=...)")
    except InterpolationResolutionError as error:
        return _Problem(f"{key}: cannot be resolved: {error}")
    if isinstance(value, DictConfig | ListConfig):
        try:
            value = OmegaConf.to_container(value, resolve=True)
        except (MissingMandatoryValue, InterpolationResolutionError) as error:
            return _Problem(f"{key}: cannot be resolved: {error}")
    return value


def _table_problems(cfg: DictConfig, table: Mapping[str, Rule]) -> tuple[list[str], dict[str, Any]]:
    """Problems of every option of ``table`` present in ``cfg``, and the values that passed."""
    problems, valid = [], {}
    for key, rule in table.items():
        value = _select(cfg, key)
        if value is _ABSENT:
            continue
        if isinstance(value, _Problem):
            problems.append(value.message)
        elif rule.accepts(value):
            valid[key] = value
        else:
            problems.append(f"{key}={show(value)}: expected {rule.expected}")
    return problems, valid


def _group_shape_problems(cfg: DictConfig, group: str, what: str) -> list[str]:
    """Every ``<group>.<name>`` is a node with a ``_target_`` (the group's own options are not read)."""
    node = OmegaConf.select(cfg, group, default=_ABSENT)
    if node is _ABSENT:
        return []
    if not isinstance(node, DictConfig):
        return [f"{group}={show(node)}: expected a mapping of {what}s by name"]
    problems = []
    for name in node:
        target = _select(cfg, f"{group}.{name}._target_")
        if not isinstance(node.get(name), DictConfig) or not string().accepts(target):
            problems.append(f"{group}.{name}: expected a {what} config node with a _target_")
    return problems


def _dataset_options_problems(valid: Mapping[str, Any]) -> list[str]:
    """The synthetic dataset's options, checked by the generator's own option class."""
    if valid.get("dataset.name") != "synthetic" or "dataset.options" not in valid:
        return []
    from reidreg.data.synthetic import resolve_synthetic_options  # numpy and PIL, no torch

    options = valid["dataset.options"]
    try:
        resolve_synthetic_options(**options)
    except (TypeError, ValueError) as error:
        return [f"dataset.options={show(options)}: {error}"]
    return []


def feature_rows(height: int, *, last_stride_one: bool) -> int:
    """Rows of a ResNet's last feature map for images ``height`` pixels high (stride 16, or 32)."""
    return math.ceil(height / (16 if last_stride_one else 32))


def stripes_cut(rows: int, num_stripes: int) -> int:
    """How many stripes ``torch.chunk(num_stripes)`` actually gives for ``rows`` rows (may be fewer)."""
    return math.ceil(rows / math.ceil(rows / num_stripes)) if rows >= 1 else 0


def _related_train_problems(valid: Mapping[str, Any]) -> list[str]:
    """Rules between options; each runs only when the options it reads passed their own rules."""
    problems = []

    def have(*keys: str) -> bool:
        return all(key in valid for key in keys)

    if have("freeze_backbone_epochs", "trainer.max_epochs") and not valid.get("trainer.fast_dev_run"):
        frozen, epochs = valid["freeze_backbone_epochs"], valid["trainer.max_epochs"]
        if frozen >= epochs:  # (a fast_dev_run smoke test runs one batch whatever the epochs)
            problems.append(
                f"freeze_backbone_epochs={frozen}: expected an integer in [0, trainer.max_epochs={epochs}) "
                "(the whole network must train for at least one epoch)"
            )
    if valid.get("loss.triplet") is True:
        for key, needs in (("data.num_identities", "negatives"), ("data.num_instances", "positives")):
            if key in valid and valid[key] < 2:
                problems.append(
                    f"{key}={valid[key]}: expected an integer >= 2 with loss.triplet=true (the batch-hard "
                    f"triplet loss needs {needs} in every batch), or set loss.triplet=false"
                )
    if valid.get("model.regional_branches") is True and have(
        "data.height", "model.num_stripes", "backbone.last_stride_one"
    ):
        stride = 16 if valid["backbone.last_stride_one"] else 32
        rows = feature_rows(valid["data.height"], last_stride_one=valid["backbone.last_stride_one"])
        wanted = valid["model.num_stripes"]
        if stripes_cut(rows, wanted) != wanted:
            possible = [n for n in range(1, rows + 1) if stripes_cut(rows, n) == n]
            problems.append(
                f"model.num_stripes={wanted}: data.height={valid['data.height']} gives a feature map of "
                f"{rows} rows (height / {stride}), which cuts into {stripes_cut(rows, wanted)} stripes, not "
                f"{wanted}; expected one of {', '.join(map(str, possible))} (or a larger data.height)"
            )
    return problems


def _related_evaluate_problems(valid: Mapping[str, Any]) -> list[str]:
    problems = []
    if valid.get("attack.name") == "fgsm" and valid.get("attack.steps") not in (None, 1):
        problems.append(f"attack.steps={valid['attack.steps']}: expected 1 or null (fgsm is a single step)")
    if valid.get("attack.random_start") is False and valid.get("attack.eps", 0) > 0:
        problems.append(
            "attack.random_start=false: expected true (the distance to the clean embedding has zero "
            "gradient at the clean image: without a random start the attack would not move)"
        )
    return problems


def _raise_if_any(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} invalid options:\n  " + "\n  ".join(problems))


def _train_config_problems(cfg: DictConfig) -> list[str]:
    problems, valid = _table_problems(cfg, TRAIN_OPTIONS)
    problems += _group_shape_problems(cfg, "regularizer", "regularizer")
    problems += _group_shape_problems(cfg, "logger", "logger")
    problems += _dataset_options_problems(valid)
    return problems + _related_train_problems(valid)


def _evaluate_config_problems(cfg: DictConfig) -> list[str]:
    problems, valid = _table_problems(cfg, EVALUATE_OPTIONS)
    problems += _dataset_options_problems(valid)
    return problems + _related_evaluate_problems(valid)


def validate_train_config(cfg: DictConfig) -> None:
    """Check every option of a composed ``reidreg.train`` config; ``ConfigError`` lists every problem."""
    _raise_if_any(_train_config_problems(cfg))


def validate_evaluate_config(cfg: DictConfig) -> None:
    """Check every option of a composed ``reidreg.evaluate`` config; ``ConfigError`` lists every problem."""
    _raise_if_any(_evaluate_config_problems(cfg))


# --------------------------------------------------------------------------------------------- folders
def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a file, if a file stands in the way)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _writable_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (probed with a file removed at once), or None."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".reidreg-write-probe-", dir=folder)
    except OSError as error:
        return f"not writable ({error.strerror or error})"
    os.close(handle)
    os.unlink(probe)
    return None


def _free_space_problem(folder: Path, min_free_bytes: int, purpose: str) -> str | None:
    free = shutil.disk_usage(folder).free
    if free >= min_free_bytes:
        return None
    return (
        f"only {free / GIB:.2f} GiB free on its file system, at least {min_free_bytes / GIB:.2f} GiB "
        f"needed ({purpose})"
    )


def _folder_problem(
    path: str | Path, option: str, *, write: bool, min_free_bytes: int, purpose: str
) -> str | None:
    """Why ``path`` cannot be used as a folder (to be created if missing, when ``write``), or None."""
    target = Path(path).expanduser().absolute()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        problem = f"{str(existing)!r} is a file, not a folder"
    elif not write:
        if existing != target:  # missing: left to the dataset loader, whose error names the layout
            return None
        try:
            with os.scandir(existing):
                problem = None
        except OSError as error:
            problem = f"not readable ({error.strerror or error})"
    else:
        problem = _writable_problem(existing) or _free_space_problem(existing, min_free_bytes, purpose)
        if problem and existing != target:
            problem += f" (its closest existing folder is {str(existing)!r})"
    return f"{option}={show(str(path))}: {problem}" if problem else None


def _output_dir_problem(
    path: str | Path, option: str, min_free_bytes: int = MIN_FREE_OUTPUT_BYTES
) -> str | None:
    return _folder_problem(
        path, option, write=True, min_free_bytes=min_free_bytes, purpose="checkpoints, logs and metrics"
    )


def _data_dir_problem(
    path: str | Path, option: str, needs_write: bool, min_free_bytes: int = MIN_FREE_DATA_BYTES
) -> str | None:
    return _folder_problem(
        path, option, write=needs_write, min_free_bytes=min_free_bytes, purpose="the synthetic dataset"
    )


def check_output_dir(
    path: str | Path, option: str = "paths.output_dir", *, min_free_bytes: int = MIN_FREE_OUTPUT_BYTES
) -> None:
    """``path`` is (or can be created as) a writable folder with ``min_free_bytes`` free; else ConfigError.

    Nothing is created: a missing folder is probed through its closest existing ancestor.
    """
    _raise_if_any([p for p in [_output_dir_problem(path, option, min_free_bytes)] if p])


def check_data_dir(
    path: str | Path,
    option: str = "paths.data_dir",
    *,
    needs_write: bool,
    min_free_bytes: int = MIN_FREE_DATA_BYTES,
) -> None:
    """The data folder is readable, and writable with ``min_free_bytes`` free when ``needs_write``.

    When nothing is to be written, a data folder that does not exist is left to the dataset loader: its
    error names the layout it expected.
    """
    _raise_if_any([p for p in [_data_dir_problem(path, option, needs_write, min_free_bytes)] if p])


def synthetic_needs_generation(data_dir: str | Path, options: Mapping[str, Any]) -> bool:
    """True unless the synthetic dataset of ``options`` is already complete under ``data_dir``.

    The folder is the one ``reidreg.data.datasets.build_dataset("synthetic", data_dir, **options)`` reads.
    """
    from reidreg.data.synthetic import is_complete, resolve_synthetic_options  # numpy and PIL, no torch

    root = Path(data_dir).expanduser()
    name = resolve_synthetic_options(**options).folder_name
    return not is_complete(root if root.name == name else root / name)


def _dataset_needs_write(cfg: DictConfig) -> bool:
    dataset = OmegaConf.select(cfg, "dataset", default=None)
    if not isinstance(dataset, DictConfig) or dataset.get("name") != "synthetic":
        return False  # real datasets are only read
    try:
        return synthetic_needs_generation(
            cfg.paths.data_dir, OmegaConf.to_container(dataset.options, resolve=True)
        )
    except (
        TypeError,
        ValueError,
    ):  # invalid options, reported by the config check: assume it is to be written
        return True


def _checkpoint_problem(path: Any, option: str = "ckpt_path") -> str | None:
    if not isinstance(path, str) or Path(path).expanduser().is_file():
        return None  # null, or not a string (reported by the config check)
    return f"{option}={show(path)}: no such file; expected a checkpoint of reidreg.train (a .ckpt file)"


def _path_problems(cfg: DictConfig, output_option: str = "paths.output_dir") -> list[str]:
    """Problems of the output folder, the data folder and ``ckpt_path`` of a train or evaluate config."""
    problems = [
        _checkpoint_problem(OmegaConf.select(cfg, "ckpt_path", default=None, throw_on_missing=False)),
        _output_dir_problem(cfg.paths.output_dir, output_option),
        _data_dir_problem(cfg.paths.data_dir, "paths.data_dir", _dataset_needs_write(cfg)),
    ]
    return [problem for problem in problems if problem]


def check_train_paths(cfg: DictConfig) -> None:
    """Folders and files of a ``reidreg.train`` config: output folder, data folder, ``ckpt_path``."""
    _raise_if_any(_path_problems(cfg))


def check_evaluate_paths(cfg: DictConfig) -> None:
    """Folders and files of a ``reidreg.evaluate`` config: output folder, data folder, ``ckpt_path``.

    Without ``dataset`` the test set is the one in the checkpoint's config, unknown here: the data folder
    is then checked for reading only.
    """
    _raise_if_any(_path_problems(cfg))


# ------------------------------------------------------------------------------------ Hydra callback
_CONFIG_PROBLEMS: dict[str, Callable[[DictConfig], list[str]]] = {
    "train": _train_config_problems,
    "evaluate": _evaluate_config_problems,
}


def validate_before_work(cfg: DictConfig, task: str, *, output_option: str = "paths.output_dir") -> None:
    """Every option of ``task``'s config (``train`` or ``evaluate``) and its folders, in one ConfigError."""
    _raise_if_any(_CONFIG_PROBLEMS[task](cfg) + _path_problems(cfg, output_option))


class ValidateBeforeRun(Callback):
    """Hydra callback: validate a single run's config and folders before Hydra creates the run folder.

    Registered in a CLI's config (``hydra.callbacks.validate``, with ``task: train`` or ``evaluate``).
    On a problem it prints ``error: ...`` and exits with status 2, leaving no run folder behind. In a
    multirun only the sweep folder is checked here; each job validates its own config when it starts.
    """

    def __init__(self, task: str) -> None:
        if task not in _CONFIG_PROBLEMS:
            raise ConfigError(
                f"ValidateBeforeRun task={task!r}: expected one of {', '.join(_CONFIG_PROBLEMS)}"
            )
        self.task = task

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = os.path.abspath(str(config.hydra.run.dir))
        task_cfg = copy.deepcopy(config)
        problems = []
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
            # ${hydra:runtime.output_dir} is set only when Hydra creates the folder: use that folder.
            if "${hydra:" in str(OmegaConf.to_container(task_cfg.paths, resolve=False).get("output_dir")):
                task_cfg.paths.output_dir = run_dir
                output_option = "hydra.run.dir"
            else:  # outputs go elsewhere, but Hydra still creates the run folder (and writes its log there)
                output_option = "paths.output_dir"
                problems.append(_output_dir_problem(run_dir, "hydra.run.dir"))
        problems += _CONFIG_PROBLEMS[self.task](task_cfg) + _path_problems(task_cfg, output_option)
        _exit_if_any(problems)
        if self.task == "train":
            _exit_if_run_dir_taken(str(task_cfg.paths.output_dir), task_cfg)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_any([_output_dir_problem(str(config.hydra.sweep.dir), "hydra.sweep.dir")])


def _exit_if_run_dir_taken(run_dir: str, cfg: DictConfig) -> None:
    """A live run there: refused (status 2); this experiment's finished run: said, status 0 (see
    ``reidreg.existing_run``). Either way before Hydra writes into the directory."""
    from reidreg.existing_run import check_before_start
    from reidreg.run_dir import is_secondary_process

    if is_secondary_process():
        return
    try:
        finished = check_before_start(run_dir, cfg)
    except ConfigError as error:
        _exit_if_any([str(error)])
    if finished:
        print(finished)
        sys.exit(0)


def _exit_if_any(problems: list[str | None]) -> None:
    """Print the problems as the CLIs print a ConfigError (``error: ...``) and exit with status 2."""
    try:
        _raise_if_any([problem for problem in problems if problem])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
