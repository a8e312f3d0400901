"""Config helpers: OmegaConf resolvers used by conf/ and a Hydra ``instantiate`` with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from reidreg.errors import ReIDRegError


def regularizer_name(regularizers: DictConfig | dict | None) -> str:
    """``none`` or the selected regularizers joined by ``+`` (e.g. ``adaptive_l2+sgsl``): a run's method."""
    names = sorted(regularizers or {})
    return "+".join(names) if names else "none"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested mapping by dotted key (an empty mapping is a leaf: ``regularizer: {}``)."""
    if isinstance(node, Mapping) and node:
        leaves: dict[str, Any] = {}
        for key, value in node.items():
            leaves.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return leaves
    return {prefix: node}


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("regularizer_name"):
        OmegaConf.register_new_resolver("regularizer_name", regularizer_name)


def instantiate(config: Any, /, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own input errors through unwrapped.

    Hydra wraps any constructor error in an ``InstantiationException``; a ``ReIDRegError`` (bad dataset
    folder, unknown backbone, missing weights file, ...) is re-raised as itself so that it reads as one
    clear message.
    """
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ReIDRegError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
