"""Networks: timm ResNet backbone split into blocks, objective modules, the AdaptiveReID model."""

from reidreg.models.backbone import BackboneError, ResNetBackbone
from reidreg.models.heads import HeadOutput, ObjectiveModule
from reidreg.models.reid_model import ReIDModel, build_reid_model

__all__ = [
    "BackboneError",
    "HeadOutput",
    "ObjectiveModule",
    "ReIDModel",
    "build_reid_model",
    "ResNetBackbone",
]
