"""One rank of a two-process job on one node, for ``test_image_cache``: ``python -m tests.node_cache_rank
RANK PORT NAME IMAGES OUT``. Joins a gloo group, builds the image cache with ``ImageCache.build_per_node``
(every image it decodes is appended to ``OUT/reads-RANK.txt``), then reads every cached image through a
DataLoader with 2 workers and saves what they returned to ``OUT/rank-RANK.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from reidreg.data.batch_augment import AugmentSpec
from reidreg.data.datamodule import read_image
from reidreg.data.image_cache import CachedTrainImages, ImageCache

H, W = 64, 32


def main(rank: int, port: int, name: str, images: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    paths = sorted(str(path) for path in images.iterdir())
    reads = out / f"reads-{rank}.txt"

    def counting_read(path: str):
        with reads.open("a") as log:
            log.write(path + "\n")
        return read_image(path)

    cache = ImageCache.build_per_node(
        paths, height=H, width=W, read=counting_read, name=name, local_rank=rank, barrier=dist.barrier
    )
    dataset = CachedTrainImages(cache, [0] * len(paths), AugmentSpec(height=H, width=W))
    loader = DataLoader(
        dataset, batch_size=4, num_workers=2, sampler=[(index, 0) for index in range(len(paths))]
    )
    seen = torch.cat([images for images, _, _ in loader])
    torch.save(seen, out / f"rank-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, port, name, images, out = sys.argv[1:]
    main(int(rank), int(port), name, Path(images), Path(out))
