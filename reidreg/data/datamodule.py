"""The LightningDataModule: datasets → images, P×K training batches, query/gallery evaluation sets.

Model selection never touches the test set: by default a few *training* identities are held out and
split into a validation query/gallery (one query image per identity and camera, the rest gallery, as in
Market-1501); "best" checkpoints are chosen on it and the test set is evaluated once, at the end.

Training augmentation is a deterministic function of ``(seed, epoch, position in the epoch)``: every
sample carries its own seed from the batch sampler, so a resumed run sees exactly the images an
uninterrupted run would, with any number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from reidreg.data.datasets import DatasetError, ReIDDataset, Sample, build_dataset
from reidreg.data.sampler import PKBatchSampler
from reidreg.data.transforms import build_test_transform, build_train_transform
from reidreg.errors import ConfigError


def read_image(path: str) -> Image.Image:
    """Open an image as RGB, or fail with an error that names the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
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
        image = read_image(path)
        # torchvision's random transforms draw from the global RNG: fork it so the seed stays local.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


class EvalImages(Dataset):
    """Query followed by gallery images: ``(image, pid, camid, is_query)``."""

    def __init__(self, query: Sequence[Sample], gallery: Sequence[Sample], transform: Callable) -> None:
        self.samples = [(*s, True) for s in query] + [(*s, False) for s in gallery]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        path, pid, camid, is_query = self.samples[index]
        return self.transform(read_image(path)), pid, camid, is_query


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler so that each index comes with a seed derived from (seed, epoch, position)."""

    def __init__(self, batch_sampler: PKBatchSampler, seed: int) -> None:
        self.batch_sampler, self.seed, self.epoch = batch_sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)

    @property
    def sampler(self) -> SeededBatches:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``, not on the batch sampler.
        return self

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rank = self.batch_sampler.rank
        for batch_index, batch in enumerate(self.batch_sampler):
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
    train: Sequence[Sample], amount: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split training identities into (train, val_query, val_gallery).

    ``amount`` is a count of identities (≥ 1) or a fraction (0 < amount < 1) of those seen in ≥ 2 cameras.
    Per held-out identity, one random image per camera is a query, the rest is gallery. The remaining
    training identities are relabelled 0..N-1.
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
        for sample in items:
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
        batch_size_test: int = 128,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dataset_name, self.root = dataset, root
        self.dataset_options = dict(dataset_options or {})
        self.train_transform = build_train_transform(
            height=height,
            width=width,
            hflip=hflip,
            pad_crop=pad_crop,
            padding=padding,
            random_erasing=random_erasing,
            random_erasing_prob=random_erasing_prob,
        )
        self.test_transform = build_test_transform(height=height, width=width)
        self.num_identities, self.num_instances = num_identities, num_instances
        self.steps_per_epoch, self.skip_small_identities = steps_per_epoch, skip_small_identities
        self.val_identities, self.batch_size_test = val_identities, batch_size_test
        self.num_workers, self.seed = num_workers, seed
        self.dataset: ReIDDataset | None = None

    def load(self) -> ReIDDataset:
        """Parse (and, for ``synthetic``, generate) the dataset; cheap to call again."""
        if self.dataset is None:
            self.dataset = build_dataset(self.dataset_name, Path(self.root), **self.dataset_options)
            train = self.dataset.train
            if self.val_identities:
                train, self.val_query, self.val_gallery = hold_out_identities(
                    train, self.val_identities, self.seed
                )
            else:
                self.val_query, self.val_gallery = [], []
            self.train_samples = train
        return self.dataset

    def prepare_data(self) -> None:
        self.load()  # generates the synthetic dataset once, on the main process

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def num_classes(self) -> int:
        self.load()
        return len({pid for _, pid, _ in self.train_samples})

    @property
    def has_validation(self) -> bool:
        self.load()
        return bool(self.val_query)

    def train_dataloader(self) -> DataLoader:
        batches = PKBatchSampler(
            [pid for _, pid, _ in self.train_samples],
            num_identities=self.num_identities,
            num_instances=self.num_instances,
            num_batches=self.steps_per_epoch,
            skip_small_identities=self.skip_small_identities,
            seed=self.seed,
        )
        return DataLoader(
            TrainImages(self.train_samples, self.train_transform),
            batch_sampler=SeededBatches(batches, self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

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
