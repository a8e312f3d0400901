"""Regularizers: one file each, all implementing ``Regularizer`` (see ``base.py`` for the hooks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from reidreg.regularizers.base import LogDict, Regularizer, StepContext, TrainingPlan, TrainStep
from reidreg.utils.config import instantiate

__all__ = ["LogDict", "Regularizer", "StepContext", "TrainStep", "TrainingPlan", "build_regularizers"]


def build_regularizers(configs: Mapping[str, Any] | None) -> nn.ModuleDict:
    """Instantiate ``regularizer.<name>`` config nodes (each with a ``_target_``) in a ModuleDict by name."""
    regularizers = nn.ModuleDict()
    for name, config in (configs or {}).items():
        regularizer = instantiate(config)
        if not isinstance(regularizer, Regularizer):
            raise TypeError(
                f"regularizer.{name}._target_ must build a reidreg Regularizer, got {type(regularizer)}"
            )
        regularizer.name = name
        regularizers[name] = regularizer
    return regularizers
