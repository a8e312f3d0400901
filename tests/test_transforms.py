"""Tests for the train/test image transforms, random erasing and denormalize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reidreg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomErasing,
    build_test_transform,
    build_train_transform,
    denormalize,
)

H, W = 64, 32  # small, to keep the tests fast; same code path as 384×128


@pytest.fixture
def image() -> Image.Image:
    # A non-square, non-symmetric RGB image of a different size, so resize, flip and crop all show.
    pixels = np.random.default_rng(0).integers(0, 256, size=(90, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def resized_pixels(image: Image.Image) -> torch.Tensor:
    """The image bilinearly resized to H×W by PIL, as a C×H×W tensor in [0, 1]."""
    return torch.from_numpy(np.array(image.resize((W, H), Image.BILINEAR))).permute(2, 0, 1) / 255


def erased_mask(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (out != reference).any(dim=0)


def test_output_shape_and_dtype(image: Image.Image) -> None:
    torch.manual_seed(0)
    for transform in (build_train_transform(height=H, width=W), build_test_transform(height=H, width=W)):
        out = transform(image)
        assert out.shape == (3, H, W) and out.dtype == torch.float32
    assert build_test_transform()(image).shape == (3, 384, 128)  # the default size (docs/protocol.md)


def test_test_transform_is_deterministic_and_normalised(image: Image.Image) -> None:
    transform = build_test_transform(height=H, width=W)
    out = transform(image)
    assert torch.equal(out, transform(image))
    resized = resized_pixels(image)
    expected = (resized - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(out, expected)


def test_train_transform_with_augmentations_off_equals_test_transform(image: Image.Image) -> None:
    train = build_train_transform(height=H, width=W, hflip=False, pad_crop=False, random_erasing=False)
    assert torch.equal(train(image), build_test_transform(height=H, width=W)(image))


def test_train_transform_is_random_and_seeded_by_torch(image: Image.Image) -> None:
    train = build_train_transform(height=H, width=W)
    torch.manual_seed(1)
    first = [train(image) for _ in range(5)]
    torch.manual_seed(1)
    again = [train(image) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(first[0], x) for x in first[1:])


def test_flip_only_gives_the_mirrored_test_output(image: Image.Image) -> None:
    test_out = build_test_transform(height=H, width=W)(image)
    flip = build_train_transform(height=H, width=W, flip_prob=1.0, pad_crop=False, random_erasing=False)
    assert torch.equal(flip(image), test_out.flip(-1))


def test_pad_crop_only_is_a_zero_padded_shift(image: Image.Image) -> None:
    pad = 10
    test_out = build_test_transform(height=H, width=W)(image)
    # Zero pixels become (0 - mean) / std after normalisation.
    zero = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    padded = torch.nn.functional.pad(test_out - zero, (pad, pad, pad, pad)) + zero
    windows = {
        (dy, dx): padded[:, dy : dy + H, dx : dx + W]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    }
    crop = build_train_transform(height=H, width=W, hflip=False, padding=pad, random_erasing=False)
    torch.manual_seed(0)
    shifts = set()
    for _ in range(20):
        out = crop(image)
        match = [s for s, win in windows.items() if torch.allclose(out, win, atol=1e-6)]
        assert match, "output must be an H×W window of the zero-padded image"
        shifts.update(match)
    assert len(shifts) > 1


@pytest.mark.parametrize("value", ["mean", "random", (0.4914, 0.4822, 0.4465)])
def test_random_erasing_p1_erases_a_region_within_bounds(image: Image.Image, value: object) -> None:
    area, min_aspect = (0.02, 0.4), 0.3
    reference = build_test_transform(height=H, width=W)(image)
    erase = build_train_transform(
        height=H,
        width=W,
        hflip=False,
        pad_crop=False,
        random_erasing_prob=1.0,
        erasing_area=area,
        erasing_min_aspect=min_aspect,
        erasing_value=value,
    )
    torch.manual_seed(0)
    for _ in range(20):
        out = erase(image)
        mask = erased_mask(out, reference)
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert rows.numel() > 0, "p=1 must erase something"
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h < H and w < W
        # h = round(√(S·r)) and w = round(√(S/r)): undo the rounding to bound the sampled area S and aspect r.
        assert (h - 0.5) * (w - 0.5) <= area[1] * H * W and (h + 0.5) * (w + 0.5) >= area[0] * H * W
        assert (h - 0.5) / (w + 0.5) <= 1 / min_aspect and (h + 0.5) / (w - 0.5) >= min_aspect
        rect = out[:, int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]
        if value != "random":
            pixels = torch.tensor(IMAGENET_MEAN if value == "mean" else value)
            fill = (pixels - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            torch.testing.assert_close(rect, fill.view(3, 1, 1).expand_as(rect))


def test_random_erasing_p0_is_identity() -> None:
    img = torch.randn(3, H, W)
    erase = RandomErasing(p=0.0, area=(0.02, 0.4), min_aspect=0.3, fill=torch.zeros(3))
    assert torch.equal(erase(img), img)


def test_random_erasing_does_not_modify_its_input() -> None:
    img = torch.randn(3, H, W)
    before = img.clone()
    RandomErasing(p=1.0, area=(0.1, 0.2), min_aspect=0.3, fill=torch.zeros(3))(img)
    assert torch.equal(img, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(random_erasing_prob=1.5), "random_erasing_prob"),
        (dict(erasing_area=(0.5, 0.2)), "erasing_area"),
        (dict(erasing_min_aspect=2.0), "erasing_min_aspect"),
        (dict(erasing_value="black"), "erasing_value"),
        (dict(erasing_value=(0.0, 0.0)), "erasing_value"),
    ],
)
def test_invalid_erasing_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_train_transform(**kwargs)


def test_denormalize_inverts_normalise(image: Image.Image) -> None:
    normalised = build_test_transform(height=H, width=W)(image)
    pixels = resized_pixels(image)
    torch.testing.assert_close(denormalize(normalised, IMAGENET_MEAN, IMAGENET_STD), pixels)
    # Batched input, and values outside the image range are clamped to [0, 1].
    batch = torch.stack([normalised, torch.full_like(normalised, 10.0)])
    out = denormalize(batch)
    torch.testing.assert_close(out[0], pixels)
    assert out.min() >= 0 and out.max() <= 1 and torch.equal(out[1], torch.ones_like(out[1]))
