"""Validation of the composed config before any work (placeholder until the full rule table lands)."""

from __future__ import annotations

from omegaconf import DictConfig


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every invalid option of a ``reidreg.train`` config."""
