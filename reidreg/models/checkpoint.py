"""A trained network out of a ``reidreg.train`` checkpoint: its run config, its weights, where to run it.

Shared by every command that uses a trained model (``reidreg.evaluate``, ``reidreg.extract``,
``reidreg.export``), so that a wrong file reads the same everywhere: one line naming ``ckpt_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reidreg.errors import ConfigError
from reidreg.models.reid_model import ReIDModel, build_reid_model
from reidreg.run_dir import STORED_CONFIG_KEY, network_weights, read_checkpoint
from reidreg.utils.config import instantiate


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The run config stored in a reidreg checkpoint and the network's weights (``model.`` prefix removed)."""
    checkpoint = read_checkpoint(path)
    return checkpoint[STORED_CONFIG_KEY], network_weights(checkpoint)


def build_model(run_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> ReIDModel:
    """The trained network, rebuilt from its config; its weights come from the checkpoint, not from a file."""
    backbone = instantiate(run_config["backbone"], pretrained=False, weights_file=None)
    num_classes = weights["global_head.classifier.weight"].shape[0]
    model = build_reid_model(run_config["model"], backbone=backbone, num_classes=num_classes)
    model.load_state_dict(weights)
    return model.eval()


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda`` → a torch device; ``auto`` is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto.")
    return torch.device(name)
