"""The embedding network of a trained model and the preprocessing its input needs.

``EmbeddingNetwork`` is what gets exported: a normalised image batch (N, 3, H, W) in, the concatenated
embedding of all objective modules (N, D) out, averaged with that of the horizontally flipped batch when
``flip`` is set — exactly ``ReIDModel.retrieval_features``, the feature evaluation ranks with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import nn

from reidreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform
from reidreg.models.reid_model import ReIDModel


class EmbeddingNetwork(nn.Module):
    """Normalised images (N, 3, H, W) → retrieval features (N, D); flip-averaged if ``flip``."""

    def __init__(self, model: ReIDModel, *, flip: bool) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.retrieval_features(images, flip=self.flip)


def preprocessing(run_config: dict[str, Any]) -> dict[str, Any]:
    """What an image must go through before the network, as the training run's test transform does it.

    ``reidreg.data.transforms.build_test_transform``: RGB → bilinear (antialiased, PIL) resize to exactly
    H×W (aspect ratio not kept) → values in [0, 1] → ``(x - mean) / std`` per channel → NCHW float32.
    """
    data = run_config["data"]
    return {
        "height": int(data["height"]),
        "width": int(data["width"]),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "value_range": [0.0, 1.0],
        # ReIDDataModule always normalises with the ImageNet statistics (the backbones' pretraining).
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": "stretch to height x width (aspect ratio not kept)",
        "interpolation": "bilinear",
        "antialias": True,
    }


def image_transform(run_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised tensor, as evaluation of the training run does it (see ``preprocessing``)."""
    spec = preprocessing(run_config)
    return build_test_transform(
        height=spec["height"], width=spec["width"], mean=spec["mean"], std=spec["std"]
    )
