"""Image transforms for ReID training and testing (METHODS.md §1 "Data").

Train: bilinear resize to H×W → horizontal flip (p=0.5) → zero padding (10 px each side) and random crop back
to H×W → to tensor in [0, 1] → ImageNet normalisation → random erasing (p=0.5, area 0.02–0.4 of the image,
aspect ratio h/w in [0.3, 1/0.3]). Test: resize → to tensor → normalisation. Each train augmentation can be
switched off; with all three off the train transform gives exactly the test transform's output.

Built on torchvision.transforms (v1) with PIL input. Random erasing is our own implementation of Zhong et al.
(arXiv 1708.04896) as the AdaptiveReID code uses it, rather than torchvision's ``RandomErasing``, which
samples the aspect ratio log-uniformly and gives up after 10 attempts (Zhong: uniform, 100 attempts).

Erased-pixel fill (``erasing_value``): ``"mean"`` (default) fills with the ImageNet mean pixel, i.e. 0 after
normalisation, as fast-reid does; ``"random"`` fills with N(0, 1) noise in normalised space (Zhong's random
variant, torchvision's ``value="random"``); a per-channel tuple of pixel values in [0, 1] fills with that
colour. The AdaptiveReID code fills with (0.4914, 0.4822, 0.4465) (the CIFAR-10 mean from Zhong's code);
pass that tuple to reproduce it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ErasingValue = Literal["mean", "random"] | Sequence[float]


class RandomErasing(torch.nn.Module):
    """Random erasing (Zhong et al., Algorithm 1) on a normalised C×H×W tensor.

    With probability ``p``, up to ``max_attempts`` times: draw a target area uniformly in ``area`` × H·W and
    an aspect ratio h/w uniformly in [min_aspect, 1/min_aspect]; the first rectangle that fits is filled with
    ``fill`` (a per-channel tensor in normalised space, or ``None`` for N(0, 1) noise). If none fits, the
    image is returned unchanged. Uses torch's global RNG, like torchvision's transforms, so DataLoader
    workers are seeded as usual.
    """

    def __init__(
        self,
        *,
        p: float,
        area: tuple[float, float],
        min_aspect: float,
        fill: Tensor | None,
        max_attempts: int = 100,
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random_erasing_prob must be in [0, 1], got {p}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"erasing_area must satisfy 0 < low <= high <= 1, got {area}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"erasing_min_aspect must be in (0, 1], got {min_aspect}")
        self.p = p
        self.area = area
        self.min_aspect = min_aspect
        self.fill = fill
        self.max_attempts = max_attempts

    def forward(self, img: Tensor) -> Tensor:
        if torch.rand(()).item() >= self.p:
            return img
        channels, height, width = img.shape
        for _ in range(self.max_attempts):
            target_area = _uniform(*self.area) * height * width
            aspect = _uniform(self.min_aspect, 1.0 / self.min_aspect)
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            # Strictly smaller than the image, as in Zhong's code.
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                img = img.clone()
                if self.fill is None:
                    patch = torch.randn(channels, h, w, dtype=img.dtype)
                else:
                    patch = self.fill.to(img).view(-1, 1, 1)
                img[:, top : top + h, left : left + w] = patch
                return img
        return img

    def extra_repr(self) -> str:
        fill = "random" if self.fill is None else [round(v, 4) for v in self.fill.tolist()]
        return f"p={self.p}, area={self.area}, min_aspect={self.min_aspect}, fill={fill}"


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _erasing_fill(value: ErasingValue, mean: Sequence[float], std: Sequence[float]) -> Tensor | None:
    """Per-channel fill in normalised space (``None`` = random noise) for a pixel-space ``erasing_value``."""
    if isinstance(value, str):
        if value == "random":
            return None
        if value != "mean":
            raise ValueError(
                f"erasing_value must be 'mean', 'random' or per-channel pixel values, got {value!r}"
            )
        value = mean
    if len(value) != len(mean):
        raise ValueError(f"erasing_value needs {len(mean)} per-channel values, got {len(value)}")
    # float() per element: the values may come from a config as an OmegaConf ListConfig.
    pixel, mean_t, std_t = (torch.tensor([float(v) for v in seq]) for seq in (value, mean, std))
    return (pixel - mean_t) / std_t


def _resize(height: int, width: int) -> T.Resize:
    # Bilinear (PIL, antialiased) to exactly H×W: ReID crops are stretched, not aspect-preserved.
    return T.Resize((height, width), interpolation=T.InterpolationMode.BILINEAR)


def build_train_transform(
    *,
    height: int = 384,
    width: int = 128,
    flip_prob: float = 0.5,
    padding: int = 10,
    random_erasing_prob: float = 0.5,
    erasing_area: tuple[float, float] = (0.02, 0.4),
    erasing_min_aspect: float = 0.3,
    erasing_value: ErasingValue = "mean",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: bool = True,
    pad_crop: bool = True,
    random_erasing: bool = True,
) -> Callable[[Image.Image], Tensor]:
    """PIL image → normalised float32 C×H×W tensor with the training augmentations (module docstring)."""
    steps: list[Callable] = [_resize(height, width)]
    if hflip:
        steps.append(T.RandomHorizontalFlip(flip_prob))
    if pad_crop:
        # Zero-pad every side, then crop a random H×W window: a translation by up to ±padding pixels.
        steps.append(T.RandomCrop((height, width), padding=padding, fill=0, padding_mode="constant"))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if random_erasing:
        # After normalisation, so the fill is defined in the space the network sees.
        steps.append(
            RandomErasing(
                p=random_erasing_prob,
                area=tuple(erasing_area),
                min_aspect=erasing_min_aspect,
                fill=_erasing_fill(erasing_value, mean, std),
            )
        )
    return T.Compose(steps)


def build_test_transform(
    *,
    height: int = 384,
    width: int = 128,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], Tensor]:
    """PIL image → normalised float32 C×H×W tensor: resize and normalise only (deterministic)."""
    return T.Compose([_resize(height, width), T.ToTensor(), T.Normalize(mean, std)])


def denormalize(
    tensor: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo ``Normalize(mean, std)`` on a C×H×W or N×C×H×W tensor, clamped to pixel values in [0, 1]."""
    mean_t, std_t = (
        torch.tensor([float(v) for v in seq], dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        for seq in (mean, std)
    )
    return (tensor * std_t + mean_t).clamp(0.0, 1.0)
