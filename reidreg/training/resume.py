"""Resume = the same experiment: a resumed run continues the checkpoint's own config, never a recomposed one.

Every reidreg checkpoint stores the run's resolved config (``reidreg_config``). ``resumed_config`` builds
the config of the resumed run from it:

* ``python -m reidreg.train ckpt_path=<run>/checkpoints/last.ckpt`` alone continues the stored experiment
  (backbone, regularizers, data, ...) in its own run directory, whatever the defaults of ``conf/`` say;
* an override that sets an operational option (``reidreg.experiment``: devices, workers, loggers, paths,
  progress display, ...) or lengthens the run (``trainer.max_epochs``) is applied;
* an override equal to the checkpoint's value is accepted;
* any other override would change the experiment (regularizer, backbone, dataset, data, loss, optim, model,
  seed, ...) and is refused, in one line listing the keys with their checkpoint and requested values.
  The set of regularizers is compared as a whole: adding (``regularizer=[constant_l2,sgsl]``), removing
  (``regularizer=none``) or swapping one is refused, whatever the options of each;
* the number of processes (``trainer.devices`` × ``trainer.num_nodes``) must stay the same: the global
  batch is P × K images per process, so another topology would be another experiment (refused).

Which keys an override touches: a ``key=value`` override touches ``key``; a config-group override
(``regularizer=sgsl``, ``experiment=quickstart``) touches every key whose composed value changes when the
group is removed again (the config is composed without it to find out).

Called from Python with a composed config and no override list (tests, notebooks), every non-operational
key of the given config must equal the checkpoint's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reidreg.errors import ConfigError
from reidreg.experiment import resume_may_change
from reidreg.utils.config import flatten

#: Config groups whose members are nodes of their own: the selected set is part of the experiment.
MEMBER_GROUPS = ("regularizer",)

MISSING = object()


def _under(keys: Sequence[str], touched: set[str]) -> set[str]:
    """The keys equal to, or inside, any of ``touched``."""
    return {key for key in keys if any(key == t or key.startswith(t + ".") for t in touched)}


def touched_keys(overrides: Sequence[str], compose: Any, requested: Mapping[str, Any]) -> set[str]:
    """Dotted keys of the requested config that ``overrides`` set (see the module docstring).

    ``compose(overrides)`` returns the unresolved, flattened config composed with those overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, touched = list(requested), set()
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override, text in zip(parsed, overrides, strict=True):
        name = override.key_or_group
        if name in ("ckpt_path",) or name.startswith("hydra"):
            continue
        if override.package is None and _is_group(name):
            # Without the group, the overrides of keys inside it have nothing to set: they go too (the keys
            # they set are touched by them anyway).
            rest = [o for o in overrides if o != text and not o.lstrip("+~").startswith(f"{name}.")]
            without = compose([*rest, f"~{name}"])
            full = compose(list(overrides))
            touched |= {name} | {
                k for k in set(full) | set(without) if full.get(k, MISSING) != without.get(k, MISSING)
            }
        else:
            touched |= _under(keys, {name}) or {name}
    return touched


def _is_group(name: str) -> bool:
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().hydra.config_loader.repository.group_exists(name)


def resumed_config(
    cfg: DictConfig,
    checkpoint_config: Mapping[str, Any],
    *,
    overrides: Sequence[str] | None,
    compose: Any = None,
) -> DictConfig:
    """The config of the resumed run; ``ConfigError`` if the request changes the checkpoint's experiment.

    ``overrides``: the command-line overrides (with ``compose``, see ``touched_keys``); ``None`` compares
    the whole of ``cfg`` instead.
    """
    requested = flatten(OmegaConf.to_container(cfg, resolve=True))
    links = flatten(OmegaConf.to_container(cfg, resolve=False))
    stored = flatten(checkpoint_config)
    touched = (
        set(requested) | set(stored) if overrides is None else touched_keys(overrides, compose, requested)
    )
    result, conflicts = dict(stored), []
    for key in sorted(touched):
        value, original = requested.get(key, MISSING), stored.get(key, MISSING)
        if value == original or (original is MISSING and _is_new_option(key, stored, requested, links)):
            continue
        if not resume_may_change(key):
            conflicts.append(key)
        elif value is not MISSING:
            result[key] = value
        elif overrides is None:  # the given config is the whole request: an option it lacks is unset
            result.pop(key, None)
    # The selected set is the checkpoint's unless the request chose one (a group override, or a whole config).
    conflicts += [
        group
        for group in MEMBER_GROUPS
        if (overrides is None or group in touched) and _members(requested, group) != _members(stored, group)
    ]
    # Options that did not exist when the checkpoint was made take their requested (default) values.
    result.update(
        {key: value for key, value in requested.items() if _is_new_option(key, stored, requested, links)}
    )
    if _topology(result) != _topology(stored):
        conflicts += [
            key for key in ("trainer.devices", "trainer.num_nodes") if key in stored or key in result
        ]
    if conflicts:
        raise ConfigError(conflict_message(cfg.get("ckpt_path"), sorted(set(conflicts)), requested, stored))
    return OmegaConf.create(unflatten(result))


def _members(leaves: Mapping[str, Any], group: str) -> set[str]:
    """The selected members of a member group (``{constant_l2, sgsl}``) in a flattened config."""
    return {key.split(".")[1] for key in leaves if key.startswith(group + ".")}


def _topology(leaves: Mapping[str, Any]) -> Any:
    """What sets a run's number of processes, for comparison: devices per node × nodes, or the raw
    specification where the devices are not a count (``auto``)."""
    devices, nodes = leaves.get("trainer.devices", 1), leaves.get("trainer.num_nodes", 1) or 1
    return devices * nodes if isinstance(devices, int) and devices > 0 else (devices, nodes)


def _is_new_option(
    key: str, stored: Mapping[str, Any], requested: Mapping[str, Any], links: Mapping[str, Any]
) -> bool:
    """The option is newer than the checkpoint: no stored key is, contains or lies inside ``key``, and it
    belongs to a node built by the same code in both.

    The request of ``ckpt_path=`` alone is composed from ``conf/``'s defaults, whose selections may differ
    from the checkpoint's: another regularizer's node, or the options of another dataset, are no new options
    of the checkpoint's. A node is identified by its ``_target_``, else its ``name``; an option that copies
    another node (``data.dataset_options: ${dataset.options}``, ``links`` = the unresolved request) is new
    only where that node's option is.
    """
    if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in stored):
        return False
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        link = re.fullmatch(r"\$\{([\w.]+)\}", str(links.get(".".join(parts[:depth]), "")))
        if link:
            return _is_new_option(".".join([link[1], *parts[depth:]]), stored, requested, links)
    if parts[0] in MEMBER_GROUPS:
        return len(parts) > 2 and parts[1] in _members(stored, parts[0])
    for depth in range(1, len(parts)):
        node = ".".join(parts[:depth])
        for identity in ("_target_", "name"):
            old, new = stored.get(f"{node}.{identity}", MISSING), requested.get(f"{node}.{identity}", MISSING)
            if old is not MISSING or new is not MISSING:
                if old != new:
                    return False
                break
    return True


def conflict_message(
    ckpt_path: Any, conflicts: list[str], requested: Mapping[str, Any], stored: Mapping[str, Any]
) -> str:
    """One line; a key present on one side only is shown at the level both sides have (``regularizer``)."""
    requested_tree, stored_tree = unflatten(requested), unflatten(stored)
    shown: dict[str, tuple[Any, Any]] = {}
    for key in conflicts:
        parts = key.split(".")
        while len(parts) > 1 and MISSING in (_get(requested_tree, parts), _get(stored_tree, parts)):
            parts = parts[:-1]
        shown[".".join(parts)] = (_get(stored_tree, parts), _get(requested_tree, parts))
    listed = "; ".join(
        f"{key}: checkpoint {_show(old)}, requested {_show(new)}" for key, (old, new) in shown.items()
    )
    subject = f"ckpt_path={ckpt_path} continues the checkpoint's experiment" if ckpt_path else "it is"
    return (
        f"{subject}, but these options would change it: {listed}. Drop those overrides to resume, or start "
        "a new run (its own directory, no ckpt_path)."
    )


def _get(tree: Mapping[str, Any], parts: Sequence[str]) -> Any:
    node: Any = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _show(value: Any) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, Mapping):  # a config group: its selected members, e.g. {constant_l2}
        return "{" + ", ".join(map(str, value)) + "}"
    return repr(value)


def unflatten(leaves: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in sorted(leaves.items()):
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if not (isinstance(value, Mapping) and not value and isinstance(node.get(last), dict)):
            node[last] = value
    return tree
