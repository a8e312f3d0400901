"""Cost of the image check (reidreg.data.image_check) on a dataset: decoding pools and the cache.

1. Pools: every image of the splits in use is stat'ed and fully decoded, serially, by a thread pool and by
   a process pool of ``--workers`` (variants interleaved ``--repeats`` times, medians of the wall clock).
   The serial run also gives the CPU time per image, which a busy shared machine inflates far less than
   the wall clock, split into the header parse (``Image.open``, Python code holding the GIL) and the rest
   (mostly PIL's C decoder, which releases it): the share threads can run in parallel.
2. Cache: ``verify_images`` with an empty cache folder (cold: reads, hashes and decodes everything) and
   then again (warm: stats only), interleaved ``--repeats`` times; the same with the check switched off
   (``decode=False``: the content hash alone, read and hashed, not decoded).

The files are in the OS page cache in every timed run (they were just read): a first read from a cold disk
or a network file system adds its own I/O time, which this does not measure.

    python benchmarks/image_check.py                           # the default synthetic set under ./data
    python benchmarks/image_check.py --dataset market1501 --data-dir /data --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from PIL import Image

from reidreg.data.datasets import build_dataset
from reidreg.data.image_check import _check, _usable_cpus, verify_images


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="synthetic", help="a build_dataset name (default: synthetic)")
    parser.add_argument("--data-dir", default="data", help="its root (synthetic: generated there if needed)")
    parser.add_argument("--workers", type=int, default=_usable_cpus(), help="pool size (default: CPUs)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def check_chunk(paths: list[str]) -> int:
    return sum(_check(path, None, decode=True).problem is None for path in paths)


def decode_all(chunks: list[list[str]], pool: Executor | None) -> int:
    return sum(map(check_chunk, chunks) if pool is None else pool.map(check_chunk, chunks))


def open_all(paths: list[str]) -> None:
    for path in paths:
        with Image.open(path):
            pass


def main() -> None:
    args = parse_args()
    dataset = build_dataset(args.dataset, args.data_dir, verbose=False)
    paths = sorted(
        {path for split in (dataset.train, dataset.query, dataset.gallery) for path, _, _ in split}
    )
    size_mib = sum(os.path.getsize(path) for path in paths) / 2**20
    print(
        f"{dataset.name}: {len(paths):,} images of the splits in use ({size_mib:.1f} MiB) in {dataset.root}"
    )
    print(f"usable CPUs: {_usable_cpus()}, pools of {args.workers}, load average {os.getloadavg()[0]:.1f}")
    chunks = [paths[index : index + 128] for index in range(0, len(paths), 128)]

    fork = multiprocessing.get_context("fork")
    with ThreadPoolExecutor(args.workers) as threads, ProcessPoolExecutor(args.workers, fork) as processes:
        variants: dict[str, Callable[[], int]] = {
            "serial": lambda: decode_all(chunks, None),
            f"{args.workers} threads": lambda: decode_all(chunks, threads),
            f"{args.workers} processes": lambda: decode_all(chunks, processes),
        }
        for run in variants.values():  # warm-up: page cache, pool start-up
            assert run() == len(paths), "broken images in the dataset"
        wall: dict[str, list[float]] = {name: [] for name in variants}
        serial_cpu: list[float] = []
        header_cpu: list[float] = []
        for _ in range(args.repeats):
            start_cpu = time.process_time()
            open_all(paths)
            header_cpu.append(time.process_time() - start_cpu)
            for name, run in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start)
                if name == "serial":
                    serial_cpu.append(time.process_time() - start_cpu)
    print("\ndecoding every image (wall clock, median of", args.repeats, "interleaved runs)")
    serial = statistics.median(wall["serial"])
    for name, times in wall.items():
        median = statistics.median(times)
        per_image = 1e6 * median / len(paths)
        print(f"  {name:>12s}: {median:6.2f} s  {per_image:6.0f} µs/image  speed-up {serial / median:4.2f}")
    cpu_per_image = statistics.median(serial_cpu) / len(paths)
    header_per_image = statistics.median(header_cpu) / len(paths)
    print(
        f"  serial CPU time: {1e6 * cpu_per_image:.0f} µs/image, of which the header parse (holds the GIL) "
        f"{1e6 * header_per_image:.0f} µs"
    )

    for decode, label in ((True, "image check"), (False, "content hash only (check off)")):
        cold, warm = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache_dir:
                for times in (cold, warm):
                    start = time.perf_counter()
                    verify_images(
                        paths,
                        root=dataset.root,
                        cache_dir=cache_dir,
                        decode=decode,
                        workers=args.workers,
                        progress=False,
                    )
                    times.append(time.perf_counter() - start)
        print(f"\nverify_images, {label}, {args.workers} threads (wall clock, median of {args.repeats})")
        print(f"  cold (empty cache): {statistics.median(cold):6.2f} s   {[round(t, 2) for t in cold]}")
        print(f"  warm (all cached):  {statistics.median(warm):6.2f} s   {[round(t, 2) for t in warm]}")


if __name__ == "__main__":
    main()
