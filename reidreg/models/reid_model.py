"""The AdaptiveReID baseline network (Ni et al., ICPR 2020, Sec. III, Fig. 2): global and regional branches.

See docs/methods/adaptivereid.md.

Global branch: blocks 1–5 → objective module. Regional branches: block 5 is *duplicated* (its own
weights, initialised from the same ones), its output map is cut into horizontal stripes, and each stripe
goes through its own 3×3 conv (to 1024 channels) + ReLU and objective module. At inference the
embeddings of all objective modules are concatenated and averaged with those of the flipped image.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from reidreg.models.backbone import ResNetBackbone
from reidreg.models.heads import HeadOutput, ObjectiveModule


class StripeBranch(nn.Module):
    """One horizontal stripe of the regional block-5 map: 3×3 conv + ReLU → objective module."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, *, clip: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = ObjectiveModule(out_channels, num_classes, clip=clip)

    def forward(self, stripe: torch.Tensor) -> HeadOutput:
        return self.head(self.act(self.conv(stripe)))


class ReIDModel(nn.Module):
    """Backbone + objective modules; ``forward`` returns one ``HeadOutput`` per objective module."""

    def __init__(
        self,
        backbone: ResNetBackbone,
        num_classes: int,
        *,
        regional_branches: bool = True,
        num_stripes: int = 2,
        stripe_channels: int = 1024,
        clip: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.global_head = ObjectiveModule(backbone.num_features, num_classes, clip=clip)
        self.regional_block5 = copy.deepcopy(backbone.block5) if regional_branches else None
        self.stripes = nn.ModuleList(
            StripeBranch(backbone.num_features, stripe_channels, num_classes, clip=clip)
            for _ in range(num_stripes if regional_branches else 0)
        )

    @property
    def head_names(self) -> list[str]:
        return ["global"] + [f"stripe{i + 1}" for i in range(len(self.stripes))]

    @property
    def objective_modules(self) -> dict[str, ObjectiveModule]:
        """Every objective module by name (the classifiers SGSL and LinR act on)."""
        return dict(zip(self.head_names, [self.global_head, *(s.head for s in self.stripes)], strict=True))

    @property
    def embedding_dim(self) -> int:
        return self.global_head.bn.num_features + sum(s.head.bn.num_features for s in self.stripes)

    def forward(self, images: torch.Tensor) -> dict[str, HeadOutput]:
        trunk = self.backbone.forward_to_block4(images)
        outputs = {"global": self.global_head(self.backbone.block5(trunk))}
        if self.regional_block5 is not None:
            regional = self.regional_block5(trunk)
            # torch.chunk along H; the last stripe is smaller if H is not divisible, as in PCB.
            for index, (branch, stripe) in enumerate(
                zip(self.stripes, regional.chunk(len(self.stripes), dim=2), strict=True)
            ):
                outputs[f"stripe{index + 1}"] = branch(stripe)
        return outputs

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated embeddings of all objective modules (the pre-BN clipped features)."""
        return torch.cat([out.embedding for out in self.forward(images).values()], dim=1)

    def retrieval_features(self, images: torch.Tensor, *, flip: bool = True) -> torch.Tensor:
        """Retrieval feature: ``embed`` averaged with that of the flipped image (official code).

        Differentiable (adversarial attacks on queries need it); use ``extract_features`` to evaluate.
        """
        features = self.embed(images)
        if flip:
            features = (features + self.embed(images.flip(dims=[3]))) / 2
        return features

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor, *, flip: bool = True) -> torch.Tensor:
        """``retrieval_features`` without autograd: what evaluation uses."""
        return self.retrieval_features(images, flip=flip)


#: ``model.*`` options about how the network runs, not what it is (``reidreg.training.device_settings``).
RUNTIME_OPTIONS = ("compile",)


def build_reid_model(config: Mapping[str, Any], *, backbone: ResNetBackbone, num_classes: int) -> ReIDModel:
    """The network of a ``model`` config node (``_target_`` and its options, runtime options left out)."""
    from reidreg.utils.config import instantiate

    options = {key: value for key, value in config.items() if key not in RUNTIME_OPTIONS}
    return instantiate(options, backbone=backbone, num_classes=num_classes)
