"""Image files → normalised tensors → embeddings, batched, with loader workers and a progress bar.

An unreadable file never raises inside a loader worker: PyTorch would re-raise it in the main process
with the worker's traceback embedded in the message. ``ImageFiles`` returns the error text instead, and
the main process decides (``on_error``): stop with one line naming the file, or leave it out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from reidreg.data import DatasetError
from reidreg.data.image_modes import read_rgb
from reidreg.deploy.image_list import ImageList
from reidreg.errors import one_line
from reidreg.models.reid_model import ReIDModel

OnError = Literal["fail", "skip"]


class ImageFiles(Dataset):
    """``(image, error)`` per file: the transformed RGB image and ``""``, or zeros and why it failed."""

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        height: int,
        width: int,
    ) -> None:
        self.paths, self.transform, self.shape = list(paths), transform, (3, height, width)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            # Decoded as evaluation does (reidreg.data.datamodule.read_image): 8-bit RGB by to_rgb.
            return self.transform(read_rgb(str(self.paths[index]))), ""
        except Exception as error:  # whatever PIL raises for a broken file, reported by the main process
            return torch.zeros(self.shape), one_line(error)


def unreadable_image_error(path: Path, reason: str) -> DatasetError:
    return DatasetError(
        f"cannot read image {str(path)!r}: {reason}; pass on_error=skip to leave unreadable images out."
    )


@dataclass
class Embeddings:
    """Features of the images that could be read (``kept`` indexes the input list) and those that failed."""

    features: torch.Tensor  # (len(kept), D) float32, on the CPU
    kept: list[int]
    failed: list[tuple[int, str]]  # (index in the input list, reason)


@torch.no_grad()
def embed_images(
    model: ReIDModel,
    images: ImageList,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    height: int,
    width: int,
    device: torch.device,
    flip: bool,
    batch_size: int,
    num_workers: int,
    on_error: OnError,
) -> Embeddings:
    """``model.extract_features`` of every image, in the order of ``images``.

    ``on_error="fail"`` raises a ``DatasetError`` naming the first unreadable file; ``"skip"`` leaves such
    files out and lists them in ``Embeddings.failed``. A progress bar is shown when stdout is a terminal.
    """
    loader = DataLoader(
        ImageFiles(images.paths, transform, height=height, width=width),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    parts: list[torch.Tensor] = []
    kept: list[int] = []
    failed: list[tuple[int, str]] = []
    console = Console()
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("embedding", total=len(images))
        start = 0  # index of the batch's first image in ``images``
        for batch, errors in loader:
            readable = []
            for position, error in enumerate(errors):
                if not error:
                    readable.append(position)
                elif on_error == "fail":
                    raise unreadable_image_error(images.paths[start + position], error)
                else:
                    failed.append((start + position, error))
            if readable:
                batch = batch[readable] if len(readable) < len(errors) else batch
                features = model.extract_features(batch.to(device, non_blocking=True), flip=flip)
                parts.append(features.cpu())
                kept.extend(start + position for position in readable)
            start += len(errors)
            bar.advance(task, len(errors))
    if not kept:
        index, reason = failed[0]
        raise DatasetError(
            f"none of the {len(images)} images could be read, e.g. {str(images.paths[index])!r}: {reason}."
        )
    return Embeddings(torch.cat(parts), kept, failed)


def read_images(
    images: ImageList, transform: Callable[[Image.Image], torch.Tensor], *, height: int, width: int
) -> torch.Tensor:
    """The transformed images as one batch (N, 3, H, W); an unreadable file is a ``DatasetError``."""
    files = ImageFiles(images.paths, transform, height=height, width=width)
    tensors = []
    for index in range(len(files)):
        image, error = files[index]
        if error:
            raise DatasetError(f"cannot read image {str(images.paths[index])!r}: {error}.")
        tensors.append(image)
    return torch.stack(tensors)
