"""The decoded-image cache: same pixels as the per-image resize, memory check before any work, errors
that name the file, and the cached loader (workers > 0) + batch augmentation = the per-image batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reidreg.data import DatasetError
from reidreg.data.batch_augment import AugmentSpec, BatchAugment
from reidreg.data.datamodule import SeededBatches, read_image
from reidreg.data.image_cache import (
    GIB,
    CachedTrainImages,
    CacheTooLargeError,
    ImageCache,
    MemoryBudget,
    cache_nbytes,
    check_cache_fits,
)
from reidreg.data.sampler import PKBatchSampler
from reidreg.data.transforms import build_train_transform, resize_to_uint8
from reidreg.errors import ConfigError

H, W = 64, 32
PLENTY = MemoryBudget(available=64 * GIB, shared=64 * GIB)


@pytest.fixture
def image_files(tmp_path: Path) -> tuple[list[str], list[int]]:
    """24 JPEG/PNG files of various sizes, 6 identities × 4 images."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for index in range(24):
        size = [(128, 64), (90, 40), (160, 70)][index % 3]
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = tmp_path / f"{index:02d}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
        labels.append(index // 4)
    return paths, labels


def test_cache_holds_exactly_the_resized_images(image_files) -> None:
    paths, _ = image_files
    cache = ImageCache.build(paths, height=H, width=W, read=read_image, num_threads=2, budget=PLENTY)
    assert cache.images.shape == (24, 3, H, W) and cache.images.dtype == torch.uint8
    assert cache.nbytes == cache_nbytes(24, H, W) == 24 * 3 * H * W
    for index, path in enumerate(paths):
        assert torch.equal(cache.images[index], resize_to_uint8(read_image(path), H, W))


def test_corrupt_image_fails_with_its_name(image_files, tmp_path: Path) -> None:
    paths, _ = image_files
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match="corrupt.jpg"):
        ImageCache.build(
            [*paths, str(corrupt)], height=H, width=W, read=read_image, num_threads=2, budget=PLENTY
        )


def test_too_large_cache_is_refused_before_reading_anything(image_files) -> None:
    paths, _ = image_files
    reads = []

    def counting_read(path: str) -> Image.Image:
        reads.append(path)
        return read_image(path)

    tight = MemoryBudget(
        available=2 * cache_nbytes(len(paths), H, W) - 1, shared=None
    )  # 50 % of it is too little
    with pytest.raises(CacheTooLargeError, match=r"data\.pipeline=cpu") as error:
        ImageCache.build(paths, height=H, width=W, read=counting_read, budget=tight)
    assert isinstance(error.value, ConfigError) and "GiB" in str(error.value)
    assert reads == []


def test_memory_check_counts_processes_and_shared_memory() -> None:
    nbytes = 3 * GIB
    check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=1 * GIB))  # forked workers: RAM only
    with pytest.raises(CacheTooLargeError, match="2 process"):
        check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=None), copies=2)
    with pytest.raises(CacheTooLargeError, match="/dev/shm"):
        check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=1 * GIB), uses_shared_memory=True)
    check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=None), max_memory_fraction=0.75, copies=2)


def test_memory_budget_is_detected() -> None:
    budget = MemoryBudget.detect()
    assert budget.available > 0
    assert budget.shared is None or budget.shared >= 0


def test_cached_loader_with_workers_and_batch_augment_equals_the_per_image_path(image_files) -> None:
    """Real loader workers on both paths, the same (index, seed) batches: identical training batches."""
    paths, labels = image_files
    spec = AugmentSpec(height=H, width=W, random_erasing_prob=0.8)
    cache = ImageCache.build(paths, height=H, width=W, read=read_image, num_threads=2, budget=PLENTY)

    def batches() -> SeededBatches:
        sampler = PKBatchSampler(labels, num_identities=3, num_instances=4, seed=0)
        seeded = SeededBatches(sampler, seed=5)
        seeded.set_epoch(2)
        return seeded

    cached_loader = DataLoader(
        CachedTrainImages(cache, labels, spec), batch_sampler=batches(), num_workers=2, pin_memory=False
    )
    transform = build_train_transform(height=H, width=W, random_erasing_prob=0.8)
    # The per-image path gets each sample's seed, as the cached path does.
    reference = [
        (
            torch.stack([transform(read_image(paths[i]), seed) for i, seed in batch]),
            [labels[i] for i, _ in batch],
        )
        for batch in batches()
    ]
    augment = BatchAugment(spec)
    cached = []
    for images, batch_labels, params in cached_loader:
        assert images.dtype == torch.uint8 and params.shape == (12, 8)
        cached.append((augment(images, params), batch_labels.tolist()))
    assert len(cached) == len(reference) > 1
    for (images, batch_labels), (expected_images, expected_labels) in zip(cached, reference, strict=True):
        assert torch.equal(images, expected_images)
        assert batch_labels == expected_labels


def test_cached_dataset_rejects_mismatched_inputs(image_files) -> None:
    paths, labels = image_files
    cache = ImageCache.build(paths[:4], height=H, width=W, read=read_image, num_threads=1, budget=PLENTY)
    with pytest.raises(ValueError, match="labels"):
        CachedTrainImages(cache, labels, AugmentSpec(height=H, width=W))
    with pytest.raises(ValueError, match="augmentation expects"):
        CachedTrainImages(cache, labels[:4], AugmentSpec(height=128, width=64))
