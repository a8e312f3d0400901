"""The objective module of AdaptiveReID (ICPR 2020, Fig. 1): GAP → clip → BN → bias-free linear.

See docs/methods/adaptivereid.md.

The clipped feature *before* BN is the embedding used for retrieval and for the triplet loss; the BN
output feeds the identity classifier (and SGSL). Clipping to [0, 1] "relieves optimization difficulties
in the succeeding triplet loss" (AdaptiveReID, Sec. III-B) and is switchable for the Table III ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadOutput:
    """What one objective module produces for a batch."""

    embedding: torch.Tensor  # (B, C) clipped GAP feature, before BN: retrieval + triplet loss
    bn_feature: torch.Tensor  # (B, C) BN output: input of the classifier
    logits: torch.Tensor  # (B, num_classes) identity logits


class ObjectiveModule(nn.Module):
    """GAP → clip [clip_min, clip_max] → BatchNorm1d → Linear(no bias), weights ~ N(0, 0.001)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        clip: bool = True,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        classifier_init_std: float = 0.001,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.clip_min, self.clip_max = clip_min, clip_max
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm1d(in_channels)
        self.classifier = nn.Linear(in_channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=classifier_init_std)

    def forward(self, feature_map: torch.Tensor) -> HeadOutput:
        embedding = self.pool(feature_map).flatten(1)
        if self.clip:
            embedding = embedding.clamp(self.clip_min, self.clip_max)
        bn_feature = self.bn(embedding)
        return HeadOutput(embedding=embedding, bn_feature=bn_feature, logits=self.classifier(bn_feature))
