"""The LightningDataModule: datasets → images, P×K training batches, query/gallery evaluation sets.

Model selection never touches the test set: by default a few *training* identities are held out and
split into a validation query/gallery (one query image per identity and camera, the rest gallery, as in
Market-1501); "best" checkpoints are chosen on it and the test set is evaluated once, at the end.

Training augmentation is a deterministic function of ``(seed, epoch, position in the epoch)``: every
sample carries its own seed from the batch sampler, so a resumed run sees exactly the images an
uninterrupted run would, with any number of workers.

Exact resume. Lightning creates the training iterator (``iter(dataloader)``) *before* it calls
``set_epoch`` for the first epoch of a ``fit``; with loader workers the iterator starts the batch
sampler at once to prefetch, so a resumed run would replay the sampler's default epoch (0). The data
module therefore records the training position (epoch, batches done) in every checkpoint
(``state_dict``) and starts the sampler there when it builds the loader after a restore
(``load_state_dict`` → ``train_dataloader``), mid-epoch checkpoints included: the batches already trained
on are skipped without loading their images.

Before any work: ``load()`` refuses a test split or validation hold-out that cannot be evaluated (no query
with a match in the gallery, an empty set; ``reidreg.data.split_check``), and ``verify_images()`` runs the
image check (``reidreg.data.image_check``) and sets ``content_hash``, the identity of the images' bytes
that run records keep. Every loader decodes images to 8-bit RGB with ``reidreg.data.image_modes.to_rgb``.

Evaluation sets are ordered identity by identity (``identity_grouped``), so that any leading slice — a
``fast_dev_run`` batch — holds queries together with their gallery matches; every item carries its
position in the canonical order (queries, then gallery, as the dataset lists them), and the metric
restores that order, so the order never changes a result.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from reidreg.data import image_check
from reidreg.data.batch_augment import AugmentSpec, BatchAugment
from reidreg.data.datasets import DatasetError, ReIDDataset, Sample, build_dataset
from reidreg.data.image_cache import (
    CachedTrainImages,
    ImageCache,
    MemoryBudget,
    cache_nbytes,
    check_cache_fits,
    workers_receive_shared_memory,
)
from reidreg.data.image_modes import read_rgb
from reidreg.data.sampler import PKBatchSampler
from reidreg.data.split_check import check_split
from reidreg.data.synthetic import SyntheticOptions, resolve_synthetic_options, shows_named_identity
from reidreg.data.transforms import TrainTransform, build_test_transform
from reidreg.errors import ConfigError

log = logging.getLogger(__name__)


def _node_cache_name(paths: Sequence[str], height: int, width: int) -> str:
    """The same on every rank of one DDP job on one node, different for another live job (its rendezvous
    address) or other images: names the job's shared image cache in /dev/shm."""
    key = hashlib.sha256(
        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}:{height}x{width}".encode()
    )
    for path in paths:
        key.update(str(path).encode() + b"\0")
    return key.hexdigest()[:20]


def read_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (``reidreg.data.image_modes.to_rgb``), or fail with an error that names
    the file."""
    try:
        return read_rgb(path)
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path!r}: {error}") from error


class TrainImages(Dataset):
    """Training images indexed by ``(index, seed)``; the seed fixes this sample's augmentation."""

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label, _ = self.samples[index]
        # The augmentation is a pure function of the image and its seed (reidreg.data.batch_augment).
        return self.transform(read_image(path), seed), label


def identity_grouped(query: Sequence[Sample], gallery: Sequence[Sample]) -> list[int]:
    """An order of the canonical evaluation list (``query + gallery``) that groups images by identity.

    Identities with queries come first, each as its queries followed by its gallery images; gallery
    images of other identities (distractors) follow. Within an identity the canonical order is kept.
    """
    members: dict[int, list[int]] = {}
    for index, (_, pid, _) in enumerate([*query, *gallery]):
        members.setdefault(pid, []).append(index)
    queried = list(dict.fromkeys(pid for _, pid, _ in query))
    others = [pid for pid in members if pid not in set(queried)]
    return [index for pid in queried + others for index in members[pid]]


class EvalImages(Dataset):
    """Query and gallery images as ``(image, pid, camid, is_query, index)``, grouped by identity.

    ``index`` is the image's position in the canonical list (queries, then gallery, as given); the metric
    sorts by it, so results do not depend on the grouping (see the module docstring).
    """

    def __init__(self, query: Sequence[Sample], gallery: Sequence[Sample], transform: Callable) -> None:
        canonical = [(*s, True) for s in query] + [(*s, False) for s in gallery]
        self.order = identity_grouped(query, gallery)
        self.samples = [canonical[i] for i in self.order]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int, bool, int]:
        path, pid, camid, is_query = self.samples[position]
        return self.transform(read_image(path)), pid, camid, is_query, self.order[position]


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler so that each index comes with a seed derived from (seed, epoch, position).

    ``start_at(epoch, batches_done)`` positions it for a resumed run: the next iteration yields that
    epoch's batches from ``batches_done`` on (later epochs are whole again).
    """

    def __init__(self, batch_sampler: PKBatchSampler, seed: int) -> None:
        self.batch_sampler, self.seed, self.epoch = batch_sampler, seed, 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) of the first iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)

    def start_at(self, epoch: int, batches_done: int) -> None:
        epoch, skip = epoch + batches_done // len(self), batches_done % len(self)
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    @property
    def sampler(self) -> SeededBatches:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``, not on the batch sampler.
        return self

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rank = self.batch_sampler.rank
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        for batch_index, batch in enumerate(self.batch_sampler):
            if batch_index < skip:
                continue
            sequence = np.random.SeedSequence([self.seed, self.epoch, rank, batch_index])
            seeds = sequence.generate_state(len(batch))
            yield [(index, int(seed)) for index, seed in zip(batch, seeds, strict=True)]


class ShardSampler(Sampler[int]):
    """Evaluation indices of one DDP rank: every sample is seen by exactly one rank, none is padded."""

    def __init__(self, size: int) -> None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world = dist.get_world_size() if initialised else 1
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


def hold_out_identities(
    train: Sequence[Sample], amount: float, seed: int, *, keep: Callable[[Sample], bool] | None = None
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split training identities into (train, val_query, val_gallery).

    ``amount`` is a count of identities (≥ 1) or a fraction (0 < amount < 1) of those seen in ≥ 2 cameras.
    Per held-out identity, one random image per camera is a query, the rest is gallery. The remaining
    training identities are relabelled 0..N-1. ``keep``: only the held-out images it accepts are
    validation images (the others are used nowhere); the identities held out and the random draws are the
    same as without it.
    """
    by_pid: dict[int, list[Sample]] = {}
    for sample in train:
        by_pid.setdefault(sample[1], []).append(sample)
    multi_camera = sorted(pid for pid, items in by_pid.items() if len({s[2] for s in items}) >= 2)
    count = int(amount) if amount >= 1 else max(1, round(amount * len(multi_camera)))
    if count >= len(by_pid) or count > len(multi_camera):
        raise ConfigError(
            f"data.val_identities={amount} asks for {count} held-out identities, but the training set has "
            f"{len(by_pid)} identities ({len(multi_camera)} seen in 2+ cameras); lower it or set it to 0."
        )
    rng = random.Random(seed)
    held_out = set(rng.sample(multi_camera, count))
    query, gallery = [], []
    for pid in sorted(held_out):
        items = list(by_pid[pid])
        rng.shuffle(items)
        seen_cameras: set[int] = set()
        for sample in (s for s in items if keep is None or keep(s)):
            (gallery if sample[2] in seen_cameras else query).append(sample)
            seen_cameras.add(sample[2])
    kept = sorted(pid for pid in by_pid if pid not in held_out)
    relabel = {pid: label for label, pid in enumerate(kept)}
    remaining = [(path, relabel[pid], camid) for path, pid, camid in train if pid in relabel]
    return remaining, query, gallery


class ReIDDataModule(pl.LightningDataModule):
    """Builds the dataset once, the P×K training loader and the validation/test query+gallery loaders."""

    def __init__(
        self,
        *,
        dataset: str,
        root: str,
        dataset_options: dict[str, Any] | None = None,
        height: int = 384,
        width: int = 128,
        hflip: bool = True,
        pad_crop: bool = True,
        padding: int = 10,
        random_erasing: bool = True,
        random_erasing_prob: float = 0.5,
        num_identities: int = 16,
        num_instances: int = 4,
        steps_per_epoch: int | None = None,
        skip_small_identities: bool = False,
        val_identities: float = 0.05,
        val_drop_mislabeled: bool = False,
        batch_size_test: int = 128,
        num_workers: int = 2,
        pipeline: str = "auto",
        seed: int = 0,
        verify_images: bool = True,
    ) -> None:
        super().__init__()
        self.dataset_name, self.root = dataset, root
        self.dataset_options = dict(dataset_options or {})
        self.augment_spec = AugmentSpec(
            height=height,
            width=width,
            hflip=hflip,
            pad_crop=pad_crop,
            padding=padding,
            random_erasing=random_erasing,
            random_erasing_prob=random_erasing_prob,
        )
        self.train_transform = TrainTransform(self.augment_spec)
        self.pipeline = pipeline
        # Set by configure_device (CPU defaults): cached images + batch augmentation on the device?
        self.use_cache, self.pin_memory, self.channels_last = False, False, False
        self.image_cache: ImageCache | None = None
        self.batch_augment: BatchAugment | None = None
        self.test_transform = build_test_transform(height=height, width=width)
        self.num_identities, self.num_instances = num_identities, num_instances
        self.steps_per_epoch, self.skip_small_identities = steps_per_epoch, skip_small_identities
        self.val_identities, self.batch_size_test = val_identities, batch_size_test
        if val_drop_mislabeled and dataset != "synthetic":
            raise ValueError(
                "val_drop_mislabeled needs the synthetic dataset: only it knows its wrong labels"
            )
        self.val_drop_mislabeled = val_drop_mislabeled
        self.num_workers, self.seed, self.check_images = num_workers, seed, verify_images
        self.dataset: ReIDDataset | None = None
        #: SHA-256 of the images of train, query and gallery (``image_check.content_hash``): set by
        #: ``verify_images()``, None before (and on DDP ranks that do not run it).
        self.content_hash: str | None = None
        # (epoch, batches done in it) of the checkpoint being resumed; see the module docstring.
        self.resume_position: tuple[int, int] | None = None

    def load(self) -> ReIDDataset:
        """Parse (and, for ``synthetic``, generate) the dataset and check its evaluation splits
        (``reidreg.data.split_check``); cheap to call again."""
        if self.dataset is None:
            dataset = build_dataset(self.dataset_name, Path(self.root), **self.dataset_options)
            check_split(
                dataset.query,
                dataset.gallery,
                name=f"test split of {dataset.name} ({dataset.root})",
                error=DatasetError,
                fix="check the dataset's query and gallery files.",
            )
            train = dataset.train
            if self.val_identities:
                train, self.val_query, self.val_gallery = hold_out_identities(
                    train, self.val_identities, self.seed, keep=self._correctly_labeled()
                )
                check_split(
                    self.val_query,
                    self.val_gallery,
                    name=f"validation hold-out data.val_identities={self.val_identities}",
                    error=ConfigError,
                    fix="hold out more identities, or set data.val_identities=0 to train without validation.",
                )
                noise = (
                    self._synthetic_options().mislabeled_percent if self.dataset_name == "synthetic" else 0
                )
                if noise and not self.val_drop_mislabeled:
                    log.warning(
                        "data.val_identities=%s on synthetic data with %s %% wrong labels: the held-out "
                        "identities carry them too, so validation mAP and best.ckpt are chosen on noisy "
                        "labels; data.val_drop_mislabeled=true validates on their correctly labelled images "
                        "only, data.val_identities=0 tests the final weights (as experiment=overfit_small "
                        "does)",
                        self.val_identities,
                        noise,
                    )
            else:
                self.val_query, self.val_gallery = [], []
            self.train_samples, self.dataset = train, dataset
        return self.dataset

    def _synthetic_options(self) -> SyntheticOptions:
        return resolve_synthetic_options(**self.dataset_options)

    def _correctly_labeled(self) -> Callable[[Sample], bool] | None:
        """With ``val_drop_mislabeled``: whether a training sample shows the identity its label says."""
        if not self.val_drop_mislabeled:
            return None
        options = self._synthetic_options()
        return lambda sample: shows_named_identity(sample[0], options)

    def configure_device(
        self, *, cuda: bool, pin_memory: bool, channels_last: bool, processes: int = 1
    ) -> None:
        """Choose the training pipeline for the device (``data.pipeline``), before any work.

        ``gpu``: images decoded once into an ``ImageCache``, augmented per batch on the device (needs a CUDA
        GPU and the memory for the cache, else a ``ConfigError``); ``cpu``: per-image decoding and
        augmentation in the loader workers; ``auto``: ``gpu`` on a CUDA GPU when the cache fits, else
        ``cpu`` (logged). Both give identical images for the same seeds."""
        self.pin_memory, self.channels_last = pin_memory, channels_last
        if self.pipeline == "gpu" and not cuda:
            raise ConfigError("data.pipeline=gpu needs a CUDA GPU to train on; use data.pipeline=auto or cpu")
        self.use_cache = self.pipeline == "gpu" or (self.pipeline == "auto" and cuda)
        if not self.use_cache:
            return
        self.load()
        nbytes = cache_nbytes(len(self.train_samples), self.augment_spec.height, self.augment_spec.width)
        try:
            if processes > 1 and self.num_workers > 0 and workers_receive_shared_memory():
                # torch cannot hand the node's file-mapped cache to spawned/forkserver workers
                raise ConfigError(
                    f"{processes} processes per node share one image cache, which loader workers started "
                    f"by '{multiprocessing.get_start_method()}' cannot map; use the 'fork' start method, "
                    "data.num_workers=0, or data.pipeline=cpu."
                )
            check_cache_fits(
                nbytes,
                MemoryBudget.detect(),
                # several processes per node share one copy in /dev/shm (ImageCache.build_per_node)
                uses_shared_memory=processes > 1
                or (self.num_workers > 0 and workers_receive_shared_memory()),
            )
        except ConfigError as error:
            if self.pipeline == "gpu":
                raise
            log.warning("data.pipeline=auto: %s Using the per-image CPU pipeline instead.", error)
            self.use_cache = False

    def prepare_data(self) -> None:
        self.load()  # generates the synthetic dataset once, on the main process

    def verify_images(self) -> None:
        """Decode every image of the splits in use (``image_check``, cached; a broken one fails here,
        images far below the training size are named in a warning) and set ``content_hash``.

        With ``verify_images=False`` the images are not decoded but still read and hashed (cached too), so
        that every run records which data it used."""
        dataset = self.load()
        paths = [path for split in (dataset.train, dataset.query, dataset.gallery) for path, _, _ in split]
        result = image_check.verify_images(
            paths,
            root=dataset.root,
            cache_dir=Path(self.root) / ".reidreg-cache",
            training_size=(self.augment_spec.height, self.augment_spec.width),
            decode=self.check_images,
        )
        self.content_hash = result.content_hash

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if stage == "fit" and self.use_cache and self.image_cache is None:
            paths = [path for path, _, _ in self.train_samples]
            spec = self.augment_spec
            trainer = self.trainer  # None when the datamodule is used without a Trainer
            if trainer is not None and trainer.num_devices > 1:
                self.image_cache = ImageCache.build_per_node(
                    paths,
                    height=spec.height,
                    width=spec.width,
                    read=read_image,
                    name=_node_cache_name(paths, spec.height, spec.width),
                    local_rank=trainer.local_rank,
                    barrier=trainer.strategy.barrier,
                )
            else:
                self.image_cache = ImageCache.build(
                    paths, height=spec.height, width=spec.width, read=read_image
                )

    @property
    def num_classes(self) -> int:
        self.load()
        return len({pid for _, pid, _ in self.train_samples})

    @property
    def has_validation(self) -> bool:
        self.load()
        return bool(self.val_query)

    def state_dict(self) -> dict[str, Any]:
        """The training position, saved in every checkpoint taken while fitting."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return {}
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_position": {"epoch": trainer.current_epoch, "batches_done": batches_done}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state.get("train_position")
        if position is not None:
            self.resume_position = (position["epoch"], position["batches_done"])

    def batch_sampler(self, *, num_replicas: int | None = None, rank: int | None = None) -> PKBatchSampler:
        """The P×K sampler of the training identities (DDP world and rank from torch.distributed if None)."""
        self.load()
        try:
            return PKBatchSampler(
                [pid for _, pid, _ in self.train_samples],
                num_identities=self.num_identities,
                num_instances=self.num_instances,
                num_batches=self.steps_per_epoch,
                skip_small_identities=self.skip_small_identities,
                seed=self.seed,
                num_replicas=num_replicas,
                rank=rank,
            )
        except ValueError as error:
            held_out = f" left after data.val_identities={self.val_identities}" if self.val_identities else ""
            raise ConfigError(
                f"data.num_identities={self.num_identities} (P) with data.num_instances={self.num_instances} "
                f"(K) cannot be sampled from the {len({s[1] for s in self.train_samples})} training "
                f"identities{held_out}: {error}"
            ) from None

    def batches_per_epoch(self, num_replicas: int = 1) -> int:
        """Training steps per epoch with ``num_replicas`` DDP processes; checks the P×K options."""
        return len(self.batch_sampler(num_replicas=num_replicas, rank=0))

    def train_dataloader(self) -> DataLoader:
        seeded = SeededBatches(self.batch_sampler(), self.seed)
        if self.resume_position is not None:
            seeded.start_at(*self.resume_position)
            self.resume_position = None
        if self.use_cache:
            labels = [pid for _, pid, _ in self.train_samples]
            dataset: Dataset = CachedTrainImages(self.image_cache, labels, self.augment_spec)
            self.batch_augment = BatchAugment(self.augment_spec, channels_last=self.channels_last)
        else:
            dataset = TrainImages(self.train_samples, self.train_transform)
        return DataLoader(
            dataset,
            batch_sampler=seeded,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: augment the cached path's (uint8 images, labels, params) batches; channels-last."""
        if self.trainer is not None and self.trainer.training:
            if self.use_cache:
                images, labels, params = batch
                return self.batch_augment(images, params), labels
            if self.channels_last:
                images, labels = batch
                return images.contiguous(memory_format=torch.channels_last), labels
        return batch

    def _eval_loader(self, query: Sequence[Sample], gallery: Sequence[Sample]) -> DataLoader:
        images = EvalImages(query, gallery, self.test_transform)
        return DataLoader(
            images,
            batch_size=self.batch_size_test,
            sampler=ShardSampler(len(images)),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_query, self.val_gallery)

    def test_dataloader(self) -> DataLoader:
        dataset = self.load()
        return self._eval_loader(dataset.query, dataset.gallery)
