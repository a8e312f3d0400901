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
* Built once per node under DDP (``ImageCache.build_per_node``): the node's local rank 0 decodes into a
  file in ``/dev/shm`` that every local rank maps (``torch.from_file(..., shared=True)``); once all have
  mapped it the file is unlinked, so the memory is freed when the last rank exits, even after a SIGKILL.
  The memory check counts that one copy, in RAM and in ``/dev/shm``. While it builds, rank 0 holds a lock
  on the file, which the kernel drops when the process dies: the next build on the node removes the files
  of builders killed before the unlink (``_remove_abandoned_cache_files``).
* Its size (N·3·H·W bytes: 147 KiB per image at 384×128, 1.8 GiB for Market-1501, 4.5 GiB for MSMT17)
  is checked against the available memory *before* anything is decoded: ``CacheTooLargeError`` (a
  ``ConfigError``) says how much is needed and available and what to do; it never falls back silently.
"""

from __future__ import annotations

import fcntl
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
from reidreg.utils.file_lock import exclusive_lock

log = logging.getLogger(__name__)

GIB = 2**30
#: By default the cache may take at most this share of the available memory: the rest is for the
#: loader workers, pinned batches, the model on the host and the evaluation features.
DEFAULT_MAX_MEMORY_FRACTION = 0.5
#: Where a node's ranks share the cache (RAM-backed on Linux).
SHARED_MEMORY_DIR = Path("/dev/shm")
NODE_CACHE_PREFIX = "reidreg-image-cache-"
_FOLDER_LOCK = f"{NODE_CACHE_PREFIX}folder.lock"  # serialises the clean-up and the creation of cache files


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
    uses_shared_memory: bool = False,
    max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION,
) -> None:
    """Raise ``CacheTooLargeError`` unless a cache of ``nbytes`` (one per node: its DDP ranks share it)
    fits in ``max_memory_fraction`` of the available memory (and, if it lives in or is handed to the
    workers through shared memory, in the free space of ``/dev/shm``)."""
    allowed = int(budget.available * max_memory_fraction)
    problems = []
    if nbytes > allowed:
        problems.append(
            f"{nbytes / GIB:.2f} GiB is more than "
            f"{max_memory_fraction:.0%} of the {budget.available / GIB:.2f} GiB of available memory"
        )
    if uses_shared_memory and budget.shared is not None and nbytes > budget.shared:
        problems.append(f"/dev/shm has only {budget.shared / GIB:.2f} GiB free for {nbytes / GIB:.2f} GiB")
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
        max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION,
        budget: MemoryBudget | None = None,
    ) -> ImageCache:
        """Decode ``paths`` with ``read`` (which names the file in its error) and resize each exactly as
        ``resize_to_uint8``; the size is checked first (``check_cache_fits``), nothing is read if it fails."""
        nbytes = cache_nbytes(len(paths), height, width)
        check_cache_fits(
            nbytes,
            budget or MemoryBudget.detect(),
            uses_shared_memory=workers_receive_shared_memory(),
            max_memory_fraction=max_memory_fraction,
        )
        images = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
        _decode_into(images, paths, read=read, num_threads=num_threads)
        return cls(images)

    @classmethod
    def build_per_node(
        cls,
        paths: Sequence[str | Path],
        *,
        height: int,
        width: int,
        read: Callable[[str], Image.Image],
        name: str,
        local_rank: int,
        barrier: Callable[[], None],
        max_memory_fraction: float = DEFAULT_MAX_MEMORY_FRACTION,
        budget: MemoryBudget | None = None,
        shared_dir: Path = SHARED_MEMORY_DIR,
    ) -> ImageCache:
        """``build`` once per node: local rank 0 decodes into ``<shared_dir>/reidreg-image-cache-<name>.u8``,
        the other local ranks map that file. Every local rank calls this with the same ``name`` (unique to
        the live job on this node) and ``barrier`` (all the job's ranks, e.g. the strategy's). The size check
        counts one copy, in RAM and in ``shared_dir``; all ranks check before any rank writes."""
        if shared_dir.is_dir():
            _remove_abandoned_cache_files(shared_dir)  # before the memory check: their space is free again
        nbytes = cache_nbytes(len(paths), height, width)
        check_cache_fits(
            nbytes,
            budget or MemoryBudget.detect(),
            uses_shared_memory=True,
            max_memory_fraction=max_memory_fraction,
        )
        path = shared_dir / f"{NODE_CACHE_PREFIX}{name}.u8"
        shape = (len(paths), 3, height, width)
        barrier()  # every rank has checked the free memory before the first byte is written
        owner = _create_locked_cache_file(path) if local_rank == 0 else None
        try:
            if local_rank == 0:
                images = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8).view(shape)
                _decode_into(images, paths, read=read)
            barrier()
            if local_rank != 0:
                images = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8).view(shape)
            barrier()
        finally:
            # Done: the mappings stay valid and the memory goes with the last of them. Failed (a corrupt
            # image, a rank that died before mapping): the job is over, so no gigabytes stay in /dev/shm.
            if owner is not None:
                path.unlink(missing_ok=True)
                os.close(owner)
        return cls(images)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def _remove_abandoned_cache_files(folder: Path) -> None:
    """Remove the node cache files in ``folder`` that no build holds a lock on: the kernel drops a lock
    when its process dies, SIGKILL included, so those were left by killed builds (their gigabytes would
    stay in RAM until a reboot). Any rank may do this: a live build's file is locked."""
    with exclusive_lock(folder / _FOLDER_LOCK) as locked:
        if locked:  # unlocked, a build's new file could be taken for an abandoned one
            for cache_file in folder.glob(f"{NODE_CACHE_PREFIX}*.u8"):
                _remove_if_abandoned(cache_file)


def _create_locked_cache_file(path: Path) -> int:
    """Create the node cache file ``path`` and return a descriptor holding a shared lock on it until the
    build ends; under the folder's lock, so that no removal ever sees the new file before its lock."""
    with exclusive_lock(path.parent / _FOLDER_LOCK):
        owner = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        fcntl.flock(owner, fcntl.LOCK_SH)
    return owner


def _remove_if_abandoned(cache_file: Path) -> None:
    """Remove ``cache_file`` unless a live build holds its lock (files one may not read or remove, such
    as another user's, are left alone)."""
    try:
        descriptor = os.open(cache_file, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cache_file.unlink()
        log.info("removed %s, left by a killed image cache build", cache_file)
    except OSError:  # locked: a live build (BlockingIOError); or not ours to remove
        pass
    finally:
        os.close(descriptor)


def _decode_into(
    images: torch.Tensor,
    paths: Sequence[str | Path],
    *,
    read: Callable[[str], Image.Image],
    num_threads: int | None = None,
) -> None:
    """Fill ``images`` (N, 3, H, W) with ``paths`` decoded and resized, in a thread pool."""
    height, width = images.shape[2:]
    threads = num_threads or len(os.sched_getaffinity(0))
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
        images.numel() / GIB,
        time.perf_counter() - start,
        threads,
    )


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
