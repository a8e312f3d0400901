"""A command's composed config checked against its rules: one ``ConfigError`` listing every problem.

``config_problems(cfg, command)`` checks, in this order (each stage only when the previous found nothing):

1. *cheap*: the value of every option of the command's table (``reidreg.options.tables``), one line per
   option (``data.num_identities='eight': expected an integer >= 1``); every key that no table declares
   (``unknown option data.num_identites; did you mean data.num_identities?``); a regularizer option
   whose regularizer is not selected (``add regularizer=constant_l2``); relations between options.
   Only omegaconf, Hydra and the standard library (numpy and PIL for the synthetic dataset's options).
2. *by import*: every selected regularizer's own options (its class's ``OPTION_RULES``, keys named as its
   constructor's parameters), and keys that the table does not declare below a node whose ``_target_``
   lies outside reidreg (``+trainer.gradient_clip_val=1``): accepted if that class's constructor takes
   them. This imports the classes (torch), so a typo or ``--help`` never gets here.

``validate_before_work`` adds the files and folders (``reidreg.options.folders``) to the cheap stage.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from reidreg.options import relations
from reidreg.options.folders import path_problems
from reidreg.options.rules import Rule, raise_if_any, show, unknown_option
from reidreg.options.tables import (
    EVALUATE_OPTIONS,
    EXPORT_OPTIONS,
    EXTRACT_OPTIONS,
    OPEN_NODES,
    TRAIN_OPTIONS,
)
from reidreg.utils.config import flatten

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the commands' config_path="../conf"
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


@dataclass(frozen=True)
class Command:
    """The rules of one command: its table and the relations between its options."""

    table: Mapping[str, Rule]
    relations: Callable[[Mapping[str, Any]], list[str]]


COMMANDS = {
    "train": Command(TRAIN_OPTIONS, relations.train_relation_problems),
    "evaluate": Command(EVALUATE_OPTIONS, relations.evaluate_relation_problems),
    "extract": Command(EXTRACT_OPTIONS, lambda valid: []),
    "export": Command(EXPORT_OPTIONS, relations.export_relation_problems),
}

_ABSENT = object()


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


# ${other.key}: checked as other.key; ${hydra:runtime.output_dir}: set (and probed) when the run starts.
_SET_ELSEWHERE = re.compile(r"\$\{(hydra:)?[\w.]+\}")


def _set_elsewhere(key: str, raw: Mapping[str, Any]) -> bool:
    """True if ``key``'s value is written as ``${hydra:...}`` or ``${other.key}`` of a key of the config
    (``raw``: its unresolved values by dotted key)."""
    match = isinstance(raw.get(key), str) and _SET_ELSEWHERE.fullmatch(raw[key])
    if not match:
        return False
    source = raw[key][2:-1]
    return bool(match.group(1)) or source in raw or any(other.startswith(f"{source}.") for other in raw)


def _rule_problems(
    cfg: DictConfig, rules: Mapping[str, Any], prefix: str = ""
) -> tuple[list[str], dict[str, Any]]:
    """Problems of every option of ``rules`` present in ``cfg`` (named ``prefix + key``), and the values
    that passed. A key missing from the config is skipped (its default applies)."""
    problems, valid, raw = [], {}, flatten(OmegaConf.to_container(cfg, resolve=False))
    for key, rule in rules.items():
        if _set_elsewhere(key, raw):
            continue  # e.g. data.seed: ${seed}, checked (and reported) as seed
        value = _select(cfg, key)
        if value is _ABSENT:
            continue
        if isinstance(value, _Problem):
            problems.append(prefix + value.message)
        elif rule.accepts(value):
            valid[key] = value
        else:
            problems.append(f"{prefix}{key}={show(value)}: expected {rule.expected}")
    return problems, valid


# ---------------------------------------------------------------------------------------- unknown keys
def leaf_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys of ``cfg``'s values (an empty mapping is a value), unresolved."""
    return list(flatten(OmegaConf.to_container(cfg, resolve=False)))


def known_keys(cfg: DictConfig, command: str) -> list[str]:
    """The keys ``command`` reads that this config holds or may hold: its table's and its open nodes'."""
    table = COMMANDS[command].table
    present = [key for key in leaf_keys(cfg) if key.startswith(OPEN_NODES) or _under_regularizer(key)]
    return [*table, *present]


def _under_regularizer(key: str) -> bool:
    return key.startswith("regularizer.")


def _foreign_target(cfg: DictConfig, key: str) -> str | None:
    """The ``_target_`` outside reidreg of the closest node above ``key`` that has one, or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        node = OmegaConf.select(cfg, ".".join(parts[:end]), default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            target = node["_target_"]
            return target if isinstance(target, str) and not target.startswith("reidreg.") else None
    return None


def available_regularizers() -> list[str]:
    """The names of conf/regularizer/*.yaml, ``none`` (the baseline) left out."""
    return sorted(path.stem for path in (CONF_DIR / "regularizer").glob("*.yaml") if path.stem != "none")


def selected_regularizers(cfg: DictConfig) -> list[str]:
    node = OmegaConf.select(cfg, "regularizer", default=None)
    if not isinstance(node, DictConfig):
        return []
    return [name for name in node if isinstance(node.get(name), DictConfig) and "_target_" in node[name]]


def unselected_regularizer_option(key: str, selected: list[str]) -> str | None:
    """For ``regularizer.<name>.<option>`` of a regularizer that is not selected: which one to add."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "regularizer" or parts[1] in selected:
        return None
    name = parts[1]
    if name not in available_regularizers():
        close = difflib.get_close_matches(name, available_regularizers(), n=1)
        hint = f"; did you mean regularizer.{close[0]}?" if close else ""
        return (
            f"regularizer.{name}: unknown regularizer; expected one of "
            f"{', '.join(available_regularizers())}{hint}"
        )
    selection = f"regularizer={name}" if not selected else f"regularizer=[{','.join([*selected, name])}]"
    return f"{key}: the regularizer {name} is not selected; add {selection}"


def _unknown_key_problems(cfg: DictConfig, table: Mapping[str, Rule]) -> tuple[list[str], list[str]]:
    """Keys no table declares: problems now, and the keys below a foreign ``_target_`` (checked by
    import)."""
    problems, deferred, known = [], [], list(table)
    selected = selected_regularizers(cfg)
    unselected = set()
    for key in leaf_keys(cfg):
        if key in table or key.startswith((*OPEN_NODES, "hydra.")):  # Hydra checks its own node
            continue
        if _under_regularizer(key):
            message = unselected_regularizer_option(key, selected)
            if message and message not in unselected:
                unselected.add(message)
                problems.append(message)
        elif _foreign_target(cfg, key):
            deferred.append(key)
        else:
            problems.append(unknown_option(key, known))
    return problems, deferred


# ------------------------------------------------------------------------------------- by import
def _constructor_parameters(target: str) -> tuple[type | None, set[str] | None, str | None]:
    """The class ``target``, its constructor's keyword names (None: it takes ``**kwargs``), or why it
    cannot be imported."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as error:  # noqa: BLE001 (any import error is reported as the option's problem)
        return None, None, f"cannot be imported ({type(error).__name__}: {error})"
    parameters = inspect.signature(cls).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return cls, None, None
    return cls, {parameter.name for parameter in parameters}, None


def _regularizer_problems(cfg: DictConfig) -> list[str]:
    """Each selected regularizer's options: names its constructor takes, values its ``OPTION_RULES``
    accept (key relative to ``regularizer.<name>``); no optimizer weight decay beside an L2 penalty."""
    problems = []
    for name in selected_regularizers(cfg):
        node, prefix = cfg.regularizer[name], f"regularizer.{name}."
        cls, parameters, why = _constructor_parameters(node["_target_"])
        if cls is None:
            problems.append(f"{prefix}_target_={show(node['_target_'])}: {why}")
            continue
        if parameters is not None:
            for key in node:
                if key not in parameters and key not in HYDRA_KEYS:
                    problems.append(unknown_option(prefix + key, [prefix + p for p in sorted(parameters)]))
        problems += _rule_problems(node, getattr(cls, "OPTION_RULES", {}), prefix)[0]
        weight_decay = OmegaConf.select(cfg, "optim.optimizer.weight_decay", default=0)
        if getattr(cls, "replaces_weight_decay", False) and weight_decay:  # a Regularizer's class attribute
            problems.append(
                f"optim.optimizer.weight_decay={show(weight_decay)}: expected 0 with regularizer={name}, "
                "an L2 penalty (L2 would count twice)"
            )
    return problems


def _foreign_key_problems(cfg: DictConfig, keys: list[str], table: Mapping[str, Rule]) -> list[str]:
    problems = []
    for key in keys:
        node_key, option = key.rsplit(".", 1)
        _, parameters, why = _constructor_parameters(_foreign_target(cfg, key))
        if why:
            problems.append(f"{node_key}._target_: {why}")
        elif parameters is not None and option not in parameters:
            problems.append(unknown_option(key, [*table, *(f"{node_key}.{p}" for p in sorted(parameters))]))
    return problems


# ------------------------------------------------------------------------------------------ entry points
def config_problems(cfg: DictConfig, command: str, *, extra: list[str] | None = None) -> list[str]:
    """Every problem of ``command``'s composed config (module docstring); ``extra``: more cheap-stage
    problems (files and folders). The import stage runs only when the cheap stage found none."""
    rules = COMMANDS[command]
    problems, valid = _rule_problems(cfg, rules.table)
    unknown, deferred = _unknown_key_problems(cfg, rules.table)
    problems += unknown + relations.dataset_options_problems(valid) + rules.relations(valid) + (extra or [])
    if problems:
        return problems
    return _regularizer_problems(cfg) + _foreign_key_problems(cfg, deferred, rules.table)


def validate_config(cfg: DictConfig, command: str) -> None:
    """Check every option of ``command``'s composed config; ``ConfigError`` lists every problem."""
    raise_if_any(config_problems(cfg, command))


def validate_before_work(cfg: DictConfig, command: str, *, output_option: str = "paths.output_dir") -> None:
    """Every option of ``command``'s config and the files and folders it names, in one ConfigError."""
    raise_if_any(config_problems(cfg, command, extra=path_problems(cfg, output_option)))
