"""The batch augmentation: per-sample parameters from seeds, equality with the per-image path, geometry,
random erasing (Zhong et al.) and vectorisation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

from reidreg.data.batch_augment import (
    ERASE_HEIGHT,
    ERASE_LEFT,
    ERASE_TOP,
    ERASE_WIDTH,
    FLIP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NOISE_SEED,
    SHIFT_X,
    SHIFT_Y,
    AugmentSpec,
    BatchAugment,
    apply_erasing,
    augment_batch,
    draw_augment_params,
    draw_batch_params,
    erasing_noise,
)
from reidreg.data.transforms import build_test_transform, build_train_transform, resize_to_uint8

H, W = 64, 32
SPEC = AugmentSpec(height=H, width=W)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def images_of_sizes(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(90, 40), (128, 64), (50, 30), (200, 70)]
    return [
        Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 4], 3), dtype=np.uint8)) for i in range(count)
    ]


def reference_geometry(pixels: torch.Tensor, params: np.ndarray, padding: int) -> torch.Tensor:
    """Flip, zero-pad and crop one uint8 (3, H, W) image by slicing: an independent reference."""
    image = pixels.flip(-1) if params[FLIP] else pixels
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = padding + int(params[SHIFT_Y]), padding + int(params[SHIFT_X])
    return padded[:, top : top + H, left : left + W]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"erasing_value": "random", "random_erasing_prob": 1.0},
        {"erasing_value": (0.4914, 0.4822, 0.4465)},
        {"hflip": False, "pad_crop": False, "random_erasing": False},
        {"flip_prob": 1.0, "padding": 4},
    ],
)
def test_per_image_path_equals_batch_path_exactly(options: dict) -> None:
    """The CPU path (PIL image + seed, one at a time) and the batch path (cached uint8 batch + the same
    seeds) give bit-identical tensors."""
    spec = dataclasses.replace(SPEC, **options)
    images = images_of_sizes(12)
    seeds = [int(s) for s in np.random.SeedSequence(7).generate_state(len(images))]
    transform = build_train_transform(height=H, width=W, **options)
    per_image = torch.stack([transform(image, seed) for image, seed in zip(images, seeds, strict=True)])
    batch = torch.stack([resize_to_uint8(image, H, W) for image in images])
    batched = BatchAugment(spec)(batch, draw_batch_params(seeds, spec))
    assert torch.equal(per_image, batched) and batched.dtype == torch.float32
    channels_last = BatchAugment(spec, channels_last=True)(batch, draw_batch_params(seeds, spec))
    assert torch.equal(channels_last, batched) and channels_last.is_contiguous(
        memory_format=torch.channels_last
    )


def test_all_augmentations_off_is_the_test_transform() -> None:
    images = images_of_sizes(4)
    spec = dataclasses.replace(SPEC, hflip=False, pad_crop=False, random_erasing=False)
    batch = torch.stack([resize_to_uint8(image, H, W) for image in images])
    out = augment_batch(batch, draw_batch_params(range(4), spec), spec)
    test = build_test_transform(height=H, width=W)
    assert torch.equal(out, torch.stack([test(image) for image in images]))


def test_params_are_a_pure_function_of_the_seed_and_within_bounds() -> None:
    spec = dataclasses.replace(SPEC, random_erasing_prob=0.7)
    draws = np.stack([draw_augment_params(seed, spec) for seed in range(400)])
    assert np.array_equal(draws, np.stack([draw_augment_params(seed, spec) for seed in range(400)]))
    assert set(draws[:, FLIP]) == {0, 1}
    assert draws[:, SHIFT_Y].min() == -10 and draws[:, SHIFT_Y].max() == 10
    assert np.abs(draws[:, SHIFT_X]).max() == 10
    erased = draws[:, ERASE_HEIGHT] > 0
    assert 0.55 < erased.mean() < 0.85  # p = 0.7, minus the rare draws where no attempt fits
    assert (draws[erased, ERASE_TOP] + draws[erased, ERASE_HEIGHT] <= H).all()
    assert (draws[erased, ERASE_LEFT] + draws[erased, ERASE_WIDTH] <= W).all()
    assert (draws[~erased, ERASE_TOP : ERASE_WIDTH + 1] == 0).all()


def test_switching_one_augmentation_off_keeps_the_others_parameters() -> None:
    no_flip = dataclasses.replace(SPEC, hflip=False)
    for seed in range(50):
        full, partial = draw_augment_params(seed, SPEC), draw_augment_params(seed, no_flip)
        assert partial[FLIP] == 0
        assert np.array_equal(np.delete(full, FLIP), np.delete(partial, FLIP))


def test_geometry_is_flip_then_zero_padded_shift() -> None:
    batch = torch.from_numpy(np.random.default_rng(1).integers(1, 256, size=(40, 3, H, W), dtype=np.uint8))
    spec = dataclasses.replace(SPEC, random_erasing=False)
    params = draw_batch_params(range(40), spec)
    out = augment_batch(batch, params, spec)
    expected = torch.stack(
        [reference_geometry(image, p.numpy(), spec.padding) for image, p in zip(batch, params, strict=True)]
    )
    assert torch.equal(out, ((expected.float() / 255) - MEAN) / STD)
    assert {int(f) for f in params[:, FLIP]} == {0, 1} and len({int(s) for s in params[:, SHIFT_X]}) > 5


@pytest.mark.parametrize("value", ["mean", (0.4914, 0.4822, 0.4465)])
def test_erasing_fills_exactly_the_drawn_rectangle(value: object) -> None:
    spec = dataclasses.replace(
        SPEC, hflip=False, pad_crop=False, random_erasing_prob=1.0, erasing_value=value
    )
    batch = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(16, 3, H, W), dtype=np.uint8))
    params = draw_batch_params(range(16), spec)
    out = augment_batch(batch, params, spec)
    clean = (batch.float() / 255 - MEAN) / STD
    pixel = torch.tensor(IMAGENET_MEAN if value == "mean" else value)
    fill = ((pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    for image, reference, p in zip(out, clean, params, strict=True):
        top, left, h, w = (int(v) for v in p[ERASE_TOP : ERASE_WIDTH + 1])
        assert 0 < h < H and 0 < w < W
        mask = torch.zeros(H, W, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        assert torch.equal(image[:, ~mask], reference[:, ~mask])
        assert torch.equal(image[:, mask], fill.expand(3, H, W)[:, mask])


def test_erasing_follows_zhong_uniform_area_and_aspect() -> None:
    """Sampled rectangles: area and aspect within the bounds (up to rounding), spread over the range."""
    spec = dataclasses.replace(SPEC, height=384, width=128, random_erasing_prob=1.0)
    rects = np.stack([draw_augment_params(seed, spec)[ERASE_TOP : ERASE_WIDTH + 1] for seed in range(2000)])
    h, w = rects[:, 2].astype(float), rects[:, 3].astype(float)
    area = h * w / (384 * 128)
    assert (h > 0).all()  # at 384×128 some attempt always fits within 100
    assert ((h - 0.5) * (w - 0.5) / (384 * 128) <= 0.4).all() and (
        (h + 0.5) * (w + 0.5) / (384 * 128) >= 0.02
    ).all()
    aspect = h / w
    assert aspect.min() < 0.5 and aspect.max() > 2.5  # the whole range [0.3, 3.33] is used
    assert ((h - 0.5) / (w + 0.5) <= 1 / 0.3).all() and ((h + 0.5) / (w - 0.5) >= 0.3).all()
    assert 0.15 < np.median(area) < 0.27  # uniform on [0.02, 0.4] (median 0.21), less the rejected tall/wide


def test_erasing_gives_up_when_no_rectangle_fits() -> None:
    # Area ≥ 99 % with a square aspect never fits strictly inside a 64×32 image: nothing is erased.
    spec = dataclasses.replace(
        SPEC,
        random_erasing_prob=1.0,
        erasing_area=(0.99, 1.0),
        erasing_min_aspect=1.0,
        hflip=False,
        pad_crop=False,
    )
    params = draw_batch_params(range(20), spec)
    assert (params[:, ERASE_HEIGHT] == 0).all()
    batch = torch.zeros(20, 3, H, W, dtype=torch.uint8)
    assert torch.equal(augment_batch(batch, params, spec), ((batch.float() / 255) - MEAN) / STD)


def test_random_fill_is_standard_normal_and_depends_only_on_seed_and_offset() -> None:
    seeds = torch.tensor([3, 3, 4])
    rows = torch.arange(H).expand(3, H)
    cols = torch.arange(W).expand(3, W)
    noise = erasing_noise(seeds, rows, cols, channels=3)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    # The same rectangle size at another position gets the same patch: it depends on the offset only.
    images = torch.zeros(2, 3, H, W)
    rects = torch.tensor([[0, 0, 10, 8], [30, 20, 10, 8]])
    erased = apply_erasing(images, rects, torch.tensor([5, 5]), fill=None)
    assert torch.equal(erased[0, :, 0:10, 0:8], erased[1, :, 30:40, 20:28])


def test_number_of_operations_does_not_grow_with_the_batch() -> None:
    """Vectorised: the same torch calls for 2 and for 32 images (no per-sample loop of kernels)."""
    spec = dataclasses.replace(SPEC, erasing_value="random")

    class CountCalls(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountCalls.calls += 1
            return func(*args, **(kwargs or {}))

    def count_calls(batch_size: int) -> int:
        batch = torch.zeros(batch_size, 3, H, W, dtype=torch.uint8)
        params = draw_batch_params(range(batch_size), spec)
        CountCalls.calls = 0
        with CountCalls():
            augment_batch(batch, params, spec)
        return CountCalls.calls

    assert count_calls(2) == count_calls(32) > 10


def test_wrong_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="64x32"):
        augment_batch(
            torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.int64), SPEC
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"flip_prob": -0.1}, "flip_prob"),
        ({"padding": -1}, "padding"),
        ({"erasing_attempts": 0}, "erasing_attempts"),
        ({"erasing_value": "black"}, "erasing_value"),
    ],
)
def test_invalid_spec_raises(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AugmentSpec(**options)


def test_noise_seed_is_only_set_when_erasing() -> None:
    spec = dataclasses.replace(SPEC, random_erasing=False)
    assert (draw_batch_params(range(20), spec)[:, NOISE_SEED] == 0).all()
