"""Decode every training image once into one uint8 array at the training size (the GPU pipeline's input).

Per-image JPEG decoding and resizing in loader workers is what limits a fast GPU (a 16-core host decodes
and augments about 3,300–4,300 images/s at 384×128; a bf16 ResNet-50 step needs more). The cache holds
each training image exactly as the per-image path would see it after the resize
(``reidreg.data.transforms.resize_to_uint8``: PIL bilinear to H×W), as one (N, 3, H, W) uint8 tensor, so
a training batch is an index into memory plus the batch augmentation (``reidreg.data.batch_augment``).

* Built in parallel by a thread pool: PIL releases the GIL while decoding and resizing.
* Shared with the DataLoader workers without copies: forked workers inherit it copy-on-write (nothing
  writes to it), and with the ``spawn``/``forkserver`` start methods torch moves it into shared memory
  (``/dev/shm``) when handing the dataset to the workers — the size check then covers ``/dev/shm`` too.
* Its size (N·3·H·W bytes: 147 KiB per image at 384×128, 1.8 GiB for Market-1501, 4.5 GiB for MSMT17)
  is checked against the available memory *before* anything is decoded: ``CacheTooLargeError`` (a
  ``ConfigError``) says how much is needed and available and what to do; it never falls back silently.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from reidreg.data.batch_augment import AugmentSpec, draw_augment_params
from reidreg.data.transforms import resize_to_uint8
from reidreg.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
#: By default the cache may take at most this share of the available memory: the rest is for the
#: loader workers, pinned batches, the model on the host and the evaluation features.
DEFAULT_MAX_MEMORY_FRACTION = 0.5


class CacheTooLargeError(ConfigError):
    """The image cache would not fit in the memory this machine has available."""


def cache_nbytes(num_images: int, height: int, width: int, channels: int = 3) -> int:
    """Bytes of an (N, C, H, W) uint8 cache."""
    return num_images * channels * height * width


@dataclass(frozen=True)
class MemoryBudget:
    """Memory available for the cache: RAM (``MemAvailable``) and free ``/dev/shm`` (None if absent)."""

    available: int
    shared: int | None

    @classmethod
    def detect(cls) -> MemoryBudget:
        return cls(available=_available_memory(), shared=_free_shared_memory())


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_shared_memory() -> int | None:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def check_cache_fits(
    nbytes: int,
    budget: MemoryBudget,
    *,
    copies: int = 1,
    uses_shared_memory: bool = False,
    max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION,
) -> None:
    """Raise ``CacheTooLargeError`` unless ``copies`` caches of ``nbytes`` (one per training process on
    this machine, e.g. DDP ranks) fit in ``max_memory_fraction`` of the available memory (and, if the
    workers receive the cache through shared memory, in the free space of ``/dev/shm``)."""
    needed = nbytes * copies
    allowed = int(budget.available * max_memory_fraction)
    problems = []
    if needed > allowed:
        problems.append(
            f"{needed / GIB:.2f} GiB ({copies} process(es) × {nbytes / GIB:.2f} GiB) is more than "
            f"{max_memory_fraction:.0%} of the {budget.available / GIB:.2f} GiB of available memory"
        )
    if uses_shared_memory and budget.shared is not None and needed > budget.shared:
        problems.append(f"/dev/shm has only {budget.shared / GIB:.2f} GiB free for {needed / GIB:.2f} GiB")
    if problems:
        raise CacheTooLargeError(
            "the decoded-image cache of data.pipeline=gpu does not fit: "
            + "; ".join(problems)
            + ". Use data.pipeline=cpu (per-image decoding in loader workers, same images), "
            "a smaller data.height/data.width, or a machine with more memory."
        )


def workers_receive_shared_memory() -> bool:
    """True if DataLoader workers get the dataset by pickling (``spawn``/``forkserver``), which moves
    tensors into ``/dev/shm``; forked workers share the parent's memory as it is."""
    return multiprocessing.get_start_method(allow_none=False) != "fork"


class ImageCache:
    """The training images, decoded and resized once: an (N, 3, H, W) uint8 tensor."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"an image cache is an (N, C, H, W) uint8 tensor, got {images.dtype} {images.shape}"
            )
        self.images = images

    @classmethod
    def build(
        cls,
        paths: Sequence[str | Path],
        *,
        height: int,
        width: int,
        read: Callable[[str], Image.Image],
        num_threads: int | None = None,
        copies: int = 1,
        max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION,
        budget: MemoryBudget | None = None,
    ) -> ImageCache:
        """Decode ``paths`` with ``read`` (which names the file in its error) and resize each exactly as
        ``resize_to_uint8``; the size is checked first (``check_cache_fits``), nothing is read if it fails."""
        nbytes = cache_nbytes(len(paths), height, width)
        check_cache_fits(
            nbytes,
            budget or MemoryBudget.detect(),
            copies=copies,
            uses_shared_memory=workers_receive_shared_memory(),
            max_memory_fraction=max_memory_fraction,
        )
        threads = num_threads or len(os.sched_getaffinity(0))
        images = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
        start = time.perf_counter()

        def load(index: int) -> None:
            images[index] = resize_to_uint8(read(str(paths[index])), height, width)

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-cache") as pool:
            try:
                for _ in pool.map(load, range(len(paths))):
                    pass
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        log.info(
            "Image cache: %d images at %dx%d (%.2f GiB) decoded in %.1f s with %d threads",
            len(paths),
            height,
            width,
            nbytes / GIB,
            time.perf_counter() - start,
            threads,
        )
        return cls(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel()


class CachedTrainImages(Dataset):
    """Training samples from an ``ImageCache``, indexed by ``(index, seed)`` as ``SeededBatches`` yields
    them: ``(uint8 image (3, H, W), label, augmentation params)``. The augmentation itself runs on the
    whole batch after the transfer (``reidreg.data.batch_augment.BatchAugment``)."""

    def __init__(self, cache: ImageCache, labels: Sequence[int], spec: AugmentSpec) -> None:
        if len(labels) != len(cache):
            raise ValueError(f"{len(labels)} labels for {len(cache)} cached images")
        if tuple(cache.images.shape[2:]) != (spec.height, spec.width):
            raise ValueError(
                f"cached images are {tuple(cache.images.shape[2:])}, augmentation expects "
                f"{(spec.height, spec.width)}"
            )
        self.cache, self.labels, self.spec = cache, list(labels), spec

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
        index, seed = key
        params = torch.from_numpy(draw_augment_params(seed, self.spec))
        return self.cache.images[index], self.labels[index], params
