"""Image transforms for ReID training and testing (docs/protocol.md, "Transforms").

Train: bilinear resize to H×W → horizontal flip (p=0.5) → zero padding (10 px each side) and random crop back
to H×W → to tensor in [0, 1] → ImageNet normalisation → random erasing (p=0.5, area 0.02–0.4 of the image,
aspect ratio h/w in [0.3, 1/0.3]). Test: resize → to tensor → normalisation. Each train augmentation can be
switched off; with all three off the train transform gives exactly the test transform's output.

The resize is PIL's bilinear (antialiased) resize, as torchvision's ``Resize`` on a PIL image; the image
cache (``reidreg.data.image_cache``) stores exactly its output. Everything after the resize is
``reidreg.data.batch_augment``: the sample's parameters are drawn from its seed by
``draw_augment_params`` and applied by ``augment_batch`` on a batch of one. The GPU pipeline applies the
same function to whole batches, so both paths give the same images for the same seeds; see that module
for the details of random erasing (Zhong et al., uniform area and aspect, 100 attempts) and its fill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from reidreg.data.batch_augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    Constants,
    ErasingValue,
    apply_erasing,
    augment_batch,
    draw_augment_params,
    draw_erasing_rect,
    normalize_uint8,
)
from reidreg.data.image_modes import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomErasing",
    "TestTransform",
    "TrainTransform",
    "build_test_transform",
    "build_train_transform",
    "denormalize",
    "resize_to_uint8",
]

# Seeds are drawn in [0, 2**32), the range of the per-sample seeds of ``SeededBatches``.
SEED_RANGE = 2**32


def resize_to_uint8(image: Image.Image, height: int, width: int) -> Tensor:
    """PIL image → uint8 (3, H, W) tensor, bilinearly resized (PIL, antialiased) to exactly H×W.

    ReID crops are stretched, not aspect-preserved. Identical to torchvision's ``Resize((H, W))`` +
    ``PILToTensor`` on an RGB PIL image; another mode is first converted by ``image_modes.to_rgb``."""
    if image.mode != "RGB" or "transparency" in image.info:
        image = to_rgb(image)
    resized = np.array(image.resize((width, height), Image.BILINEAR))  # writable, as torch wants
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()


def _seed_from_torch() -> int:
    return int(torch.randint(0, SEED_RANGE, (), dtype=torch.int64).item())


class TrainTransform:
    """PIL image (+ its seed) → normalised float32 (3, H, W) tensor with the training augmentations.

    ``transform(image, seed)`` is a pure function of the image and the seed. Without a seed one is drawn
    from torch's global RNG, as torchvision's random transforms do, so DataLoader workers are seeded as
    usual."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec
        self._constants = Constants.build(spec, "cpu")

    def __call__(self, image: Image.Image, seed: int | None = None) -> Tensor:
        pixels = resize_to_uint8(image, self.spec.height, self.spec.width)
        params = torch.from_numpy(
            draw_augment_params(_seed_from_torch() if seed is None else seed, self.spec)
        )
        return augment_batch(pixels[None], params[None], self.spec, self._constants)[0].contiguous()

    def __repr__(self) -> str:
        return f"TrainTransform({self.spec})"


class TestTransform:
    """PIL image → normalised float32 (3, H, W) tensor: resize and normalise only (deterministic)."""

    def __init__(self, height: int, width: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.height, self.width = height, width
        self._constants = Constants.build(AugmentSpec(height=height, width=width, mean=mean, std=std), "cpu")

    def __call__(self, image: Image.Image) -> Tensor:
        pixels = resize_to_uint8(image, self.height, self.width)
        return normalize_uint8(pixels, self._constants.mean, self._constants.std)

    def __repr__(self) -> str:
        return f"TestTransform(height={self.height}, width={self.width})"


class RandomErasing(torch.nn.Module):
    """Random erasing (Zhong et al., Algorithm 1) alone, on a normalised C×H×W tensor.

    With probability ``p``, up to ``max_attempts`` times: draw a target area uniformly in ``area`` × H·W and
    an aspect ratio h/w uniformly in [min_aspect, 1/min_aspect]; the first rectangle that fits is filled with
    ``fill`` (a per-channel tensor in normalised space, or ``None`` for N(0, 1) noise). If none fits, the
    image is returned unchanged. The draw and the fill are those of the training transform
    (``reidreg.data.batch_augment``); the seed comes from torch's global RNG.
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
        # Validation (ValueError naming the option) by the spec of the full augmentation.
        AugmentSpec(
            random_erasing_prob=p,
            erasing_area=area,
            erasing_min_aspect=min_aspect,
            erasing_attempts=max_attempts,
        )
        self.p, self.area, self.min_aspect = p, tuple(area), min_aspect
        self.fill, self.max_attempts = fill, max_attempts

    def forward(self, img: Tensor) -> Tensor:
        rng = np.random.default_rng(_seed_from_torch())
        if rng.random() >= self.p:
            return img
        _, height, width = img.shape
        rect = draw_erasing_rect(
            rng, height, width, area=self.area, min_aspect=self.min_aspect, attempts=self.max_attempts
        )
        fill = None if self.fill is None else self.fill.to(img).view(-1, 1, 1)
        noise_seed = torch.tensor([int(rng.integers(0, 2**31))])
        return apply_erasing(img[None], torch.tensor([rect]), noise_seed, fill)[0]

    def extra_repr(self) -> str:
        fill = "random" if self.fill is None else [round(v, 4) for v in self.fill.tolist()]
        return f"p={self.p}, area={self.area}, min_aspect={self.min_aspect}, fill={fill}"


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
) -> Callable[..., Tensor]:
    """PIL image (+ optional seed) → normalised float32 C×H×W tensor with the training augmentations."""
    return TrainTransform(
        AugmentSpec(
            height=height,
            width=width,
            hflip=hflip,
            flip_prob=flip_prob,
            pad_crop=pad_crop,
            padding=padding,
            random_erasing=random_erasing,
            random_erasing_prob=random_erasing_prob,
            erasing_area=erasing_area,
            erasing_min_aspect=erasing_min_aspect,
            erasing_value=erasing_value,
            mean=mean,
            std=std,
        )
    )


def build_test_transform(
    *,
    height: int = 384,
    width: int = 128,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], Tensor]:
    """PIL image → normalised float32 C×H×W tensor: resize and normalise only (deterministic)."""
    return TestTransform(height, width, mean, std)


def denormalize(
    tensor: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo ``Normalize(mean, std)`` on a C×H×W or N×C×H×W tensor, clamped to pixel values in [0, 1]."""
    mean_t, std_t = (
        torch.tensor([float(v) for v in seq], dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        for seq in (mean, std)
    )
    return (tensor * std_t + mean_t).clamp(0.0, 1.0)
