"""The decoded-image cache: same pixels as the per-image resize, memory check before any work, errors
that name the file, and the cached loader (workers > 0) + batch augmentation = the per-image batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reidreg.data import DatasetError, datamodule
from reidreg.data.batch_augment import AugmentSpec, BatchAugment
from reidreg.data.datamodule import SeededBatches, read_image
from reidreg.data.image_cache import (
    GIB,
    SHARED_MEMORY_DIR,
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
from tests.test_multinode import free_port

REPO = Path(__file__).resolve().parents[1]
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


def test_memory_check_counts_one_copy_and_shared_memory() -> None:
    nbytes = 3 * GIB
    check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=1 * GIB))  # forked workers: RAM only
    with pytest.raises(CacheTooLargeError, match="more than 50%"):
        check_cache_fits(nbytes, MemoryBudget(available=5 * GIB, shared=None))
    with pytest.raises(CacheTooLargeError, match="/dev/shm"):
        check_cache_fits(nbytes, MemoryBudget(available=8 * GIB, shared=1 * GIB), uses_shared_memory=True)
    check_cache_fits(nbytes, MemoryBudget(available=5 * GIB, shared=None), max_memory_fraction=0.75)


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


def test_two_ranks_of_a_node_share_one_decoded_cache(image_files, tmp_path_factory) -> None:
    """Two real processes in a gloo group, as two DDP ranks of one node: rank 0 alone decodes, both ranks'
    loader workers (2 each) see exactly the single-process cache, and nothing is left in /dev/shm."""
    paths, _ = image_files
    images = Path(paths[0]).parent
    out = tmp_path_factory.mktemp("ranks")
    name = f"test-{uuid.uuid4().hex}"
    port = free_port()
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.node_cache_rank",
                str(rank),
                str(port),
                name,
                str(images),
                str(out),
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for rank in (0, 1)
    ]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    reads = {rank: (out / f"reads-{rank}.txt") for rank in (0, 1)}
    assert sorted(reads[0].read_text().split()) == sorted(paths) and not reads[1].exists()
    expected = ImageCache.build(sorted(paths), height=H, width=W, read=read_image, budget=PLENTY).images
    for rank in (0, 1):
        assert torch.equal(torch.load(out / f"rank-{rank}.pt"), expected)
    assert not list(SHARED_MEMORY_DIR.glob(f"reidreg-image-cache-{name}*"))


def test_a_node_cache_too_large_for_shared_memory_is_refused_before_any_decode(image_files) -> None:
    paths, _ = image_files
    barriers = []
    no_shm = MemoryBudget(available=64 * GIB, shared=cache_nbytes(len(paths), H, W) - 1)
    with pytest.raises(CacheTooLargeError, match="/dev/shm has only"):
        ImageCache.build_per_node(
            paths,
            height=H,
            width=W,
            read=lambda path: pytest.fail(f"decoded {path}"),
            name="never",
            local_rank=0,
            barrier=lambda: barriers.append(1),
            budget=no_shm,
        )
    assert barriers == []


class RankDied(RuntimeError):
    pass


@pytest.mark.parametrize("failure", ["corrupt image", "other rank died after the decode"])
def test_a_failed_node_build_leaves_nothing_in_shared_memory(image_files, tmp_path: Path, failure) -> None:
    paths, _ = image_files
    corrupt_image = failure == "corrupt image"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    barriers = []

    def barrier() -> None:  # the second barrier follows rank 0's decode: there the others would map it
        barriers.append(1)
        if not corrupt_image and len(barriers) == 2:
            raise RankDied("rank 1 is gone")

    shared_dir = tmp_path / "shm"
    shared_dir.mkdir()
    with pytest.raises((DatasetError, RankDied)):
        ImageCache.build_per_node(
            [*paths, str(corrupt)] if corrupt_image else paths,
            height=H,
            width=W,
            read=read_image,
            name="failed",
            local_rank=0,
            barrier=barrier,
            budget=PLENTY,
            shared_dir=shared_dir,
        )
    assert len(barriers) == (1 if corrupt_image else 2)
    # no cache file; only the builds' empty lock file stays
    assert [path.name for path in shared_dir.iterdir()] == ["reidreg-image-cache-folder.lock"]
    assert (shared_dir / "reidreg-image-cache-folder.lock").stat().st_size == 0


def test_the_next_node_build_removes_the_file_of_a_killed_build_and_keeps_a_live_one(
    image_files, tmp_path: Path
) -> None:
    """Local rank 0 killed (SIGKILL) mid-build cannot unlink its cache file; the next build on the node
    removes it, and leaves the file of a build still running."""
    paths, _ = image_files
    images = Path(paths[0]).parent
    shared_dir = tmp_path / "shm"
    shared_dir.mkdir()

    def stalled_build(name: str) -> subprocess.Popen:
        ready = tmp_path / f"{name}.ready"
        build = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stalled_cache_build",
                name,
                str(images),
                str(shared_dir),
                str(ready),
            ],
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while not ready.exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the build did not start decoding"
        return build

    killed, live = stalled_build("killed"), stalled_build("live")
    try:
        killed.kill()
        killed.wait(timeout=30)
        cache_files = sorted(path.name for path in shared_dir.glob("*.u8"))
        assert cache_files == ["reidreg-image-cache-killed.u8", "reidreg-image-cache-live.u8"]
        cache = ImageCache.build_per_node(
            paths,
            height=H,
            width=W,
            read=read_image,
            name="next",
            local_rank=0,
            barrier=lambda: None,
            budget=PLENTY,
            shared_dir=shared_dir,
        )
        expected = ImageCache.build(paths, height=H, width=W, read=read_image, budget=PLENTY).images
        assert torch.equal(cache.images, expected)
        # the killed build's file is gone, the live one's kept, and the new build's own unlinked
        assert sorted(path.name for path in shared_dir.glob("*.u8")) == ["reidreg-image-cache-live.u8"]
    finally:
        live.kill()
        live.wait(timeout=30)


@pytest.mark.parametrize("pipeline", ["gpu", "auto"])
def test_spawned_workers_cannot_map_a_node_cache_refused_or_cpu_pipeline(
    pipeline, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(datamodule, "workers_receive_shared_memory", lambda: True)  # as under spawn
    data = datamodule.ReIDDataModule(
        dataset="synthetic",
        root=str(tmp_path),
        dataset_options={"num_ids": 8, "images_per_id": 4, "height": H, "width": W},
        height=H,
        width=W,
        num_identities=2,
        num_instances=2,
        val_identities=0,
        num_workers=2,
        pipeline=pipeline,
    )
    configure = dict(cuda=True, pin_memory=False, channels_last=False, processes=2)
    if pipeline == "gpu":
        with pytest.raises(ConfigError, match="2 processes per node share one image cache"):
            data.configure_device(**configure)
    else:
        data.configure_device(**configure)
        assert not data.use_cache
    data.num_workers = 0  # without workers the shared cache is used
    data.configure_device(**configure)
    assert data.use_cache
