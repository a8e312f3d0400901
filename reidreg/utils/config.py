"""OmegaConf resolvers used by the configs in conf/."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def regularizer_name(regularizers: DictConfig | dict | None) -> str:
    """``none`` or the selected regularizers joined by ``+`` (e.g. ``adaptive_l2+sgsl``): a run's method."""
    names = sorted(regularizers or {})
    return "+".join(names) if names else "none"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("regularizer_name"):
        OmegaConf.register_new_resolver("regularizer_name", regularizer_name)
