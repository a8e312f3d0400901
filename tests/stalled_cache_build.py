"""A node's local rank 0 that stalls in the middle of its image cache build, for ``test_image_cache``:
``python -m tests.stalled_cache_build NAME IMAGES SHARED_DIR READY``. It creates the cache file in
SHARED_DIR and, at the first image it would decode, touches READY and waits to be killed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from reidreg.data.datamodule import read_image
from reidreg.data.image_cache import GIB, ImageCache, MemoryBudget


def main(name: str, images: Path, shared_dir: Path, ready: Path) -> None:
    def stalling_read(path: str):
        ready.touch()
        time.sleep(3600)
        return read_image(path)

    ImageCache.build_per_node(
        sorted(str(path) for path in images.iterdir()),
        height=64,
        width=32,
        read=stalling_read,
        name=name,
        local_rank=0,
        barrier=lambda: None,
        budget=MemoryBudget(available=64 * GIB, shared=64 * GIB),
        shared_dir=shared_dir,
    )


if __name__ == "__main__":
    name, images, shared_dir, ready = sys.argv[1:]
    main(name, Path(images), Path(shared_dir), Path(ready))
