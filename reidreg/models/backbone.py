"""timm ResNet backbones split into the five blocks of AdaptiveReID (ICPR 2020, Sec. III-A, Fig. 2).

See docs/methods/adaptivereid.md, "Backbone".

Block 1 is the stem (conv1, bn1, act, maxpool), blocks 2–5 are ``layer1``–``layer4``. The
*last stride 1* trick sets the stride-2 convolutions of ``layer4[0]`` to stride 1 (and drops the
stride-2 average pool of ``-d`` variants), which doubles the height and width of the last feature map.
It is deliberately *not* timm's ``output_stride=16``, which dilates ``layer4`` and is a different network.

Pretrained weights never download silently: ``pretrained=True`` reads ``weights_file`` (a local
timm/torchvision state dict); ``allow_download=True`` downloads it there once (``reidreg.models.pretrained``).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from reidreg.models.pretrained import BackboneError, pretrained_network

# The only families whose block structure (stem + layer1..layer4) this module knows how to split.
SUPPORTED_PREFIXES = ("resnet", "test_resnet", "seresnet", "resnext", "wide_resnet")


def _create_timm_model(
    name: str, *, pretrained: bool, weights_file: str | None, allow_download: bool
) -> nn.Module:
    if not name.startswith(SUPPORTED_PREFIXES) or name.split(".")[0] not in timm.list_models():
        known = ", ".join(["resnet18", "resnet50", "resnet101", "resnet152", "test_resnet"])
        raise BackboneError(
            f"backbone.name={name!r} is not a timm ResNet this project can split into blocks; "
            f"use one of {known} (optionally with a pretrained tag, e.g. resnet50.tv_in1k)."
        )
    if not pretrained:
        return timm.create_model(name, pretrained=False)
    return pretrained_network(name, weights_file=weights_file, allow_download=allow_download)


def set_last_stride_one(layer4: nn.Sequential) -> None:
    """Block 5 keeps its input resolution: stride 1 in its first residual unit (AdaptiveReID, Sec. III-A)."""
    first = layer4[0]
    for module in first.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
    downsample = getattr(first, "downsample", None)
    if isinstance(downsample, nn.Sequential):
        for index, module in enumerate(downsample):
            # ResNet-D shortcut: AvgPool(2, stride 2) before a 1x1 conv; timm uses Identity for stride 1.
            if isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
                downsample[index] = nn.Identity()


def remove_last_bn_relu(layer4: nn.Sequential) -> list[str]:
    """RBR of SGSL (Yang et al., AAAI 2023, official code): "remove the last BN-ReLU" of the backbone.

    See docs/methods/sgsl.md, "RBR".

    The official code replaces the last torchvision bottleneck's ``bn3`` and its ``relu`` module, which
    torchvision shares between all three activations. In timm the same layers are ``bn3`` and
    ``act1``, ``act2``, ``act3`` of ``layer4[-1]`` (``bn2``, ``act1``, ``act2`` in a BasicBlock). Each is
    replaced by ``nn.Identity``; the returned names (relative to block 5) say exactly what was removed.
    """
    last_index = len(layer4) - 1
    last = layer4[last_index]
    last_bn = "bn3" if hasattr(last, "bn3") else "bn2"
    names = [last_bn] + [act for act in ("act1", "act2", "act3") if hasattr(last, act)]
    for attr in names:
        setattr(last, attr, nn.Identity())
    return [f"{last_index}.{attr}" for attr in names]


class ResNetBackbone(nn.Module):
    """A timm ResNet as five blocks (``block1`` stem .. ``block5`` = layer4), without its classifier."""

    def __init__(
        self,
        name: str = "resnet50",
        *,
        pretrained: bool = False,
        weights_file: str | None = None,
        allow_download: bool = False,
        last_stride_one: bool = True,
        rbr: bool = False,
    ) -> None:
        super().__init__()
        net = _create_timm_model(
            name, pretrained=pretrained, weights_file=weights_file, allow_download=allow_download
        )
        self.name = name
        self.block1 = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.block2, self.block3, self.block4, self.block5 = net.layer1, net.layer2, net.layer3, net.layer4
        if last_stride_one:
            set_last_stride_one(self.block5)
        self.rbr_removed = remove_last_bn_relu(self.block5) if rbr else []
        self.num_features = net.num_features
        self.block4_channels = _out_channels(net.layer3)

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.block1, self.block2, self.block3, self.block4, self.block5]

    def forward_to_block4(self, images: torch.Tensor) -> torch.Tensor:
        """Shared trunk (blocks 1–4), whose output feeds the global and the regional block 5."""
        x = images
        for block in self.blocks[:4]:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.block5(self.forward_to_block4(images))


def _out_channels(layer: nn.Sequential) -> int:
    last_conv = [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1]
    return last_conv.out_channels
