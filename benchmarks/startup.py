"""Startup time and peak memory of ``python -m reidreg.train`` on an MSMT17-sized tree it builds itself, and
the memory of the training-image cache there (``--sections runs cache``, both by default).

1. The tree: ``<data-dir>/MSMT17_V1/{train,test}/<pid>/`` with list_train/val/query/gallery.txt, named as
   the real MSMT17 V1 (``0000_000_01_0303morning_0015_0.jpg``: pid, index, camera 01-15, day and time,
   frame, detection) and with its counts: train 1,041 identities, 30,248 + 2,373 (list_val) images; test
   3,060 identities, 11,659 query and 82,161 gallery images; 126,441 files. Each identity is seen by 2-6
   cameras and its gallery images cover them all, so every query has a match from another camera. The
   images are 128×64 JPEGs (a few noise patterns per identity, written by a process pool), smaller than
   real MSMT17 crops: decoding them is cheaper than decoding the real ones. ``--scale`` takes that fraction
   of every image count (at least 34 training identities: 2 processes × P=16 after the 5 % hold-out).
   Built once: ``<data-dir>/MSMT17_V1/.startup-benchmark.json`` marks a complete tree and its counts.
2. The runs: the CLI as a user types it, with the default data settings (384×128, ``combine_val``, the
   hold-out, 2 loader workers) and the tiny ``backbone=test_resnet`` so that startup dominates; one
   training step (``+trainer.max_steps=1``), no test (``test=false``), each in its own run folder under
   ``--runs-dir``. Rows: 1 and 2 processes (``trainer.devices``; DDP with gloo on the CPU) × pipeline
   (``cpu``; ``gpu``, the in-memory image cache built once per node, only where there is a CUDA GPU per
   process: reidreg refuses ``data.pipeline=gpu`` on a CPU; section 4 measures its cache on any machine)
   × first start (``<data-dir>/.reidreg-cache`` deleted: the image check decodes every file) and cached
   start (the check only stats them).
3. The figures: **startup**, the wall time from launching the command until rank 0 begins its first
   training step (its step-1 progress line, ``progress.every_n_steps=1``, less that step's duration from
   Lightning's simple profiler, ``run_training_batch``): imports, dataset parsing, image check, DDP
   launch, cache build, loader workers and the first batch (the ranks have just met in DDP's broadcast of
   the weights: the others begin within a batch fetch of rank 0); **image check**, the seconds it prints;
   **peak node PSS**, the largest sum of the proportional set sizes (``/proc/<pid>/smaps_rollup``) of the
   command's process tree (ranks and loader workers; a page shared by n processes counts 1/n in each)
   and **max RSS**, the largest resident set of one of its processes, both sampled every 0.2 s until the
   first step begins (the step's own memory, the network's activations, is left out).
4. The image cache (the ``gpu`` pipeline's, ``reidreg.data.image_cache``), without the CLI: the images a run
   trains on (list_train + list_val less the 5 % held-out identities, as the datamodule's
   ``hold_out_identities``), decoded at ``--height``×``--width`` by ranks in spawned processes (a gloo
   group over 127.0.0.1) in three variants: 1 rank calling ``ImageCache.build``; 2 ranks each calling
   ``build`` (a private copy per rank); 2 ranks calling ``build_per_node`` (local rank 0 decodes into
   ``/dev/shm``, the other maps it: a copy per node). Each rank then reads a byte of every page of the
   cache, so that all of it is resident in that rank, and holds it until it has been measured. Figures:
   **build**, the seconds of the slowest rank in its build call; **cache computed**, N·3·H·W bytes per
   copy times the copies; **node PSS before**, the ranks' summed PSS once they have met, before the
   build (Python, torch, reidreg); **peak node PSS** and **peak RSS per rank** as for the runs, sampled
   every 0.2 s from the start of the ranks until all hold the cache (a page of ``/dev/shm`` mapped by
   both ranks counts half in each: summed PSS counts it once); **/dev/shm**, the growth of its used space
   while the ranks hold the cache (the file is unlinked by then but still mapped). One measurement each.

The files are in the OS page cache (they were just written or read): a first read from a cold disk or a
network file system adds its own I/O time, which this does not measure.

    python benchmarks/startup.py --scale 0.02                     # about 2,500 files: a check of the script
    python benchmarks/startup.py --data-dir /scratch/startup-msmt17 --repeats 3
    python benchmarks/startup.py --data-dir /scratch/startup-msmt17 --sections cache   # ~10 GiB of RAM
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import mmap
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from reidreg.data.datamodule import hold_out_identities, read_image
from reidreg.data.datasets import MSMT_LIST_FILES, MSMT_NUM_CAMERAS, build_dataset
from reidreg.data.image_cache import SHARED_MEMORY_DIR, ImageCache, cache_nbytes

GIB = 2**30
DATASET_FOLDER = "MSMT17_V1"
TREE_MARKER = ".startup-benchmark.json"
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64
PATTERNS_PER_IDENTITY = 4
MIN_TRAIN_IDENTITIES = 34  # 2 ranks × P=16 identities per batch, after the 5 % validation hold-out
VAL_IDENTITIES = 0.05  # data.val_identities
TIMES_OF_DAY = [
    f"{day}{part}" for day in ("0113", "0114", "0302", "0303") for part in ("morning", "noon", "afternoon")
]
SAMPLE_INTERVAL_S = 0.2
IMAGE_CHECK_LINE = re.compile(r"image check: .* threads, ([\d.]+) s\)")
FIRST_STEP_LINE = re.compile(r"\bstep 1(/\d+)?  global ")  # progress line, logged as step 1 ends
FIRST_STEP_SECONDS = re.compile(r"^\|\s+run_training_batch\s+\|\s+([\d.e+-]+)")  # the profiler's report


@dataclasses.dataclass(frozen=True)
class TreeCounts:
    """Identities and images of an MSMT17 V1 tree (the real one by default)."""

    train_ids: int = 1_041
    train_images: int = 30_248  # list_train.txt
    val_images: int = 2_373  # list_val.txt: more images of the training identities
    test_ids: int = 3_060
    query_images: int = 11_659
    gallery_images: int = 82_161

    @classmethod
    def scaled(cls, scale: float) -> TreeCounts:
        real = cls()
        counts = {
            field.name: max(1, round(scale * getattr(real, field.name))) for field in dataclasses.fields(cls)
        }
        counts["train_ids"] = max(counts["train_ids"], MIN_TRAIN_IDENTITIES)
        return cls(**counts)

    @property
    def total(self) -> int:
        return self.train_images + self.val_images + self.query_images + self.gallery_images

    def describe(self) -> str:
        return (
            f"train {self.train_ids:,} ids, {self.train_images:,} + {self.val_images:,} (val) images; "
            f"test {self.test_ids:,} ids, {self.query_images:,} query + {self.gallery_images:,} gallery; "
            f"{self.total:,} files"
        )


@dataclasses.dataclass(frozen=True)
class IdentityFolder:
    """One pid folder to write: its images go, in this order, to the list files named in ``lists``."""

    folder: Path  # <split folder>/<pid>
    pid: int
    seed: int
    lists: tuple[tuple[str, int], ...]  # (list file, number of images)


@dataclasses.dataclass(frozen=True)
class Measurement:
    startup_s: float
    image_check_s: float
    peak_node_pss: int  # bytes
    max_rss: int  # bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="default: data/startup-msmt17-x<scale>")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of every image count (0-1]")
    parser.add_argument("--runs-dir", type=Path, help="default: outputs/startup-benchmark/<date>_<time>")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="trainer.devices values")
    parser.add_argument(
        "--pipelines", nargs="+", choices=["cpu", "gpu"], help="default: cpu, and gpu with enough CUDA GPUs"
    )
    parser.add_argument("--height", type=int, default=384, help="data.height")
    parser.add_argument("--width", type=int, default=128, help="data.width")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row of the runs table (medians)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing the tree")
    parser.add_argument(
        "--sections", nargs="+", choices=["runs", "cache"], default=["runs", "cache"], help="what to measure"
    )
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    args.accelerator = "gpu" if torch.cuda.device_count() >= max(args.processes) else "cpu"
    if args.pipelines is None:
        args.pipelines = ["cpu", "gpu"] if args.accelerator == "gpu" else ["cpu"]
    elif "gpu" in args.pipelines and args.accelerator == "cpu":
        parser.error(
            f"the gpu pipeline needs {max(args.processes)} CUDA GPUs, found {torch.cuda.device_count()}"
        )
    args.data_dir = args.data_dir or Path(f"data/startup-msmt17-x{args.scale:g}")
    args.runs_dir = args.runs_dir or Path("outputs/startup-benchmark") / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    return args


# ---------------------------------------------------------------------------------------------- the tree
def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def identity_folders(dataset: Path, counts: TreeCounts) -> list[IdentityFolder]:
    """Every pid folder of the tree; each list's images spread evenly over the identities of its split."""
    splits = (
        (
            "train",
            counts.train_ids,
            {"list_train.txt": counts.train_images, "list_val.txt": counts.val_images},
        ),
        (
            "test",
            counts.test_ids,
            {"list_query.txt": counts.query_images, "list_gallery.txt": counts.gallery_images},
        ),
    )
    folders = []
    for split, num_ids, list_totals in splits:
        per_identity = [split_evenly(total, num_ids) for total in list_totals.values()]
        for pid in range(num_ids):
            lists = tuple(
                (name, split_counts[pid])
                for name, split_counts in zip(list_totals, per_identity, strict=True)
            )
            folders.append(IdentityFolder(dataset / split / f"{pid:04d}", pid, len(folders), lists))
    if any(max(count for _, count in folder.lists) < 2 for folder in folders):
        raise SystemExit(f"too small a --scale: an identity has < 2 images to show in 2 cameras ({counts})")
    return folders


def noise_patterns(seed: int) -> list[bytes]:
    """A few JPEGs of one identity: its colour plus noise."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=3)
    patterns = []
    for _ in range(PATTERNS_PER_IDENTITY):
        noise = rng.normal(0, 40, size=(IMAGE_HEIGHT, IMAGE_WIDTH, 3))
        pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
        stream = io.BytesIO()
        Image.fromarray(pixels).save(stream, format="JPEG", quality=90)
        patterns.append(stream.getvalue())
    return patterns


def write_identity(identity: IdentityFolder) -> list[tuple[str, str]]:
    """Write one pid folder; its (list file, line) pairs. Its images cycle through the identity's 2-6
    cameras, so its largest list (list_train, list_gallery) shows every one of them."""
    rng = random.Random(identity.seed)
    largest_list = max(count for _, count in identity.lists)
    cameras = rng.sample(range(1, MSMT_NUM_CAMERAS + 1), min(rng.randint(2, 6), largest_list))
    time_of_day = rng.choice(TIMES_OF_DAY)
    patterns = noise_patterns(identity.seed)
    identity.folder.mkdir(parents=True)
    list_files = [name for name, count in identity.lists for _ in range(count)]
    lines = []
    for index, list_file in enumerate(list_files):
        camera = cameras[index % len(cameras)]
        frame, detection = rng.randrange(10_000), rng.randrange(3)
        name = f"{identity.pid:04d}_{index:03d}_{camera:02d}_{time_of_day}_{frame:04d}_{detection}.jpg"
        (identity.folder / name).write_bytes(patterns[index % len(patterns)])
        lines.append((list_file, f"{identity.folder.name}/{name} {identity.pid}"))
    return lines


def ensure_tree(data_dir: Path, counts: TreeCounts, workers: int) -> Path:
    """``<data_dir>/MSMT17_V1`` with ``counts``: reused if this built it complete, else built (in a
    temporary sibling, renamed when done). A folder of that name that this did not build is refused."""
    dataset = data_dir / DATASET_FOLDER
    marker = dataset / TREE_MARKER
    if dataset.exists():
        if not marker.is_file():
            raise SystemExit(f"{dataset} was not built by this benchmark; give another --data-dir")
        if json.loads(marker.read_text()) != dataclasses.asdict(counts):
            raise SystemExit(f"{dataset} holds a tree of other counts ({marker}); give another --data-dir")
        return dataset
    partial = data_dir / f".{DATASET_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted build
    start = time.perf_counter()
    lines: dict[str, list[str]] = {name: [] for name in MSMT_LIST_FILES}
    with Pool(workers) as pool:
        for identity_lines in pool.imap(write_identity, identity_folders(partial, counts), chunksize=16):
            for list_file, line in identity_lines:
                lines[list_file].append(line)
    for list_file, list_lines in lines.items():
        (partial / list_file).write_text("\n".join(list_lines) + "\n")
    (partial / TREE_MARKER).write_text(json.dumps(dataclasses.asdict(counts)))
    partial.rename(dataset)
    print(f"built {dataset} ({counts.total:,} files) in {time.perf_counter() - start:.1f} s")
    return dataset


# ---------------------------------------------------------------------------------------------- the runs
def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], list(roots)
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in kB, from /proc/<pid>/smaps_rollup; zeros if it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as lines:
            for line in lines:
                name, _, value = line.partition(":")
                fields[name] = value
    except OSError:
        return 0, 0
    return int(fields.get("Pss", "0 kB").split()[0]), int(fields.get("Rss", "0 kB").split()[0])


@dataclasses.dataclass(frozen=True)
class MemorySample:
    seconds: float  # since the launch
    pss_kib: int  # summed over the process tree
    max_rss_kib: int  # of its largest process


class MemorySampler(threading.Thread):
    """Every ``SAMPLE_INTERVAL_S`` until ``stop``, and whenever ``sample`` is called: a ``MemorySample`` of
    the process trees of ``roots``."""

    def __init__(self, roots: list[int], start: float) -> None:
        super().__init__(daemon=True)
        self.roots, self.start_time, self.stop = roots, start, threading.Event()
        self.samples: list[MemorySample] = []

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> MemorySample:
        usage = [memory_kib(pid) for pid in process_tree(self.roots)]
        pss, rss = sum(pss for pss, _ in usage), max((rss for _, rss in usage), default=0)
        self.samples.append(MemorySample(time.perf_counter() - self.start_time, pss, rss))
        return self.samples[-1]


def train_command(args: argparse.Namespace, run_dir: Path, processes: int, pipeline: str) -> list[str]:
    return [
        sys.executable, "-m", "reidreg.train",
        "dataset=msmt17", f"paths.data_dir={args.data_dir.absolute()}",
        "backbone=test_resnet", f"trainer={args.accelerator}", f"trainer.devices={processes}",
        f"data.pipeline={pipeline}", f"data.height={args.height}", f"data.width={args.width}",
        "+trainer.max_steps=1", "+trainer.profiler=simple", "test=false",
        "progress.mode=lines", "progress.every_n_steps=1", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def measure(command: list[str], output_file: Path) -> Measurement:
    """Run ``command`` to its end; its startup and image check time (from its output) and its memory until
    then. The first step begins its duration (rank 0's, from the profiler) before its progress line."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    first_step_end_s = first_step_s = image_check_s = None
    with output_file.open("w") as output:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        sampler = MemorySampler([process.pid], start)
        sampler.start()
        for line in process.stdout:
            output.write(line)
            if first_step_end_s is None and FIRST_STEP_LINE.search(line):
                first_step_end_s = time.perf_counter() - start
            if match := FIRST_STEP_SECONDS.search(line):
                first_step_s = float(match.group(1))
            if match := IMAGE_CHECK_LINE.search(line):
                image_check_s = float(match.group(1))
        process.wait()
        sampler.stop.set()
        sampler.join()
    if process.returncode != 0 or None in (first_step_end_s, first_step_s, image_check_s):
        raise SystemExit(f"{' '.join(command)} failed (exit status {process.returncode}); see {output_file}")
    startup_s = first_step_end_s - first_step_s
    startup_samples = [sample for sample in sampler.samples if sample.seconds <= startup_s]
    return Measurement(
        startup_s=startup_s,
        image_check_s=image_check_s,
        peak_node_pss=1024 * max(sample.pss_kib for sample in startup_samples),
        max_rss=1024 * max(sample.max_rss_kib for sample in startup_samples),
    )


def median_measurement(measurements: list[Measurement]) -> Measurement:
    return Measurement(
        *(statistics.median(values) for values in zip(*map(dataclasses.astuple, measurements), strict=True))
    )


def table_row(row: tuple[int, str, str], figures: Measurement) -> str:
    processes, pipeline, start = row
    return (
        f"| {processes} | {pipeline} | {start} | {figures.startup_s:.1f} | {figures.image_check_s:.2f} "
        f"| {figures.peak_node_pss / GIB:.2f} | {figures.max_rss / GIB:.2f} |"
    )


def rows(args: argparse.Namespace) -> Iterator[tuple[int, str, str]]:
    for processes in args.processes:
        for pipeline in args.pipelines:
            for start in ("first", "cached"):
                yield processes, pipeline, start


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?"
    )
    gpus = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
    return (
        f"{model}, {len(os.sched_getaffinity(0))} cores{f', {gpus}' if gpus else ''}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )


def runs_section(args: argparse.Namespace) -> list[str]:
    """The startup runs; the lines of their table."""
    image_check_cache = args.data_dir / ".reidreg-cache"
    measurements: dict[tuple[int, str, str], list[Measurement]] = {row: [] for row in rows(args)}
    for repeat in range(args.repeats):
        for row in measurements:
            processes, pipeline, start = row
            if start == "first":
                shutil.rmtree(image_check_cache, ignore_errors=True)
            label = f"{processes}proc-{pipeline}-{start}-{repeat}"
            run_dir = (args.runs_dir / label).absolute()
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            measurement = measure(
                train_command(args, run_dir, processes, pipeline), run_dir.with_suffix(".out")
            )
            measurements[row].append(measurement)
            print(f"{label}: {table_row(row, measurement)}", flush=True)
    return [
        f"training on {args.accelerator} at {args.height}×{args.width}, backbone=test_resnet, one step",
        f"runs (outputs and run folders): {args.runs_dir}; medians of {args.repeats}\n",
        "| processes | pipeline | start | startup s | image check s | peak node PSS GiB | max RSS GiB |",
        "|---:|---|---|---:|---:|---:|---:|",
        *(table_row(row, median_measurement(repeats)) for row, repeats in measurements.items()),
    ]


# --------------------------------------------------------------------------------------- the image cache
@dataclasses.dataclass(frozen=True)
class CacheVariant:
    name: str
    processes: int
    per_node: bool  # ImageCache.build_per_node, else ImageCache.build in every rank

    @property
    def copies(self) -> int:
        return 1 if self.per_node else self.processes


CACHE_VARIANTS = (
    CacheVariant("build", 1, per_node=False),
    CacheVariant("build in each rank", 2, per_node=False),
    CacheVariant("build_per_node", 2, per_node=True),
)


@dataclasses.dataclass(frozen=True)
class CacheMeasurement:
    build_s: float  # of the slowest rank
    node_pss_before: int  # bytes: the ranks' summed PSS once they have met, before the build
    peak_node_pss: int  # bytes
    max_rss: int  # bytes
    shared_memory: int  # bytes of /dev/shm in use while the ranks hold the cache, more than before


def training_paths(data_dir: Path) -> list[str]:
    """The images a run trains on: list_train + list_val (``combine_val``) less the identities held out for
    validation (``data.val_identities=0.05``, ``seed=0``)."""
    dataset = build_dataset("msmt17", data_dir, combine_val=True, verbose=False)
    train, _, _ = hold_out_identities(dataset.train, VAL_IDENTITIES, seed=0)
    return [path for path, _, _ in train]


def cache_rank(
    rank: int,
    variant: CacheVariant,
    port: int,
    paths: list[str],
    size: tuple[int, int],
    parent: multiprocessing.connection.Connection,
) -> None:
    """One rank (a spawned process): join the group, tell the parent and wait for it to measure; build the
    cache, read a byte of each of its pages (all of it resident in this rank, mapped ones too), send the
    build seconds and hold the cache until the parent has measured again."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=variant.processes
    )
    parent.send(None)
    parent.recv()
    height, width = size
    start = time.perf_counter()
    if variant.per_node:
        cache = ImageCache.build_per_node(
            paths,
            height=height,
            width=width,
            read=read_image,
            name=f"startup-benchmark-{port}",
            local_rank=rank,
            barrier=dist.barrier,
        )
    else:
        cache = ImageCache.build(paths, height=height, width=width, read=read_image)
    build_s = time.perf_counter() - start
    cache.images.view(-1)[:: mmap.PAGESIZE].sum()
    parent.send(build_s)
    parent.recv()
    dist.destroy_process_group()


def shared_memory_used() -> int:
    stats = os.statvfs(SHARED_MEMORY_DIR)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gather(
    connections: list[multiprocessing.connection.Connection], ranks: list[multiprocessing.Process]
) -> list[float | None]:
    """What each rank sends on its connection; SystemExit if one dies first."""
    messages = []
    for connection, process in zip(connections, ranks, strict=True):
        if connection not in multiprocessing.connection.wait([connection, process.sentinel]):
            raise SystemExit(f"an image cache rank failed (exit status {process.exitcode})")
        messages.append(connection.recv())
    return messages


def measure_cache(variant: CacheVariant, paths: list[str], size: tuple[int, int]) -> CacheMeasurement:
    """Start the variant's ranks and sample their memory: every ``SAMPLE_INTERVAL_S``, once all have met in
    their group, and once all hold the cache."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    pipes = [context.Pipe() for _ in range(variant.processes)]
    ranks = [
        context.Process(target=cache_rank, args=(rank, variant, port, paths, size, child), daemon=True)
        for rank, (_, child) in enumerate(pipes)
    ]
    for process in ranks:
        process.start()
    sampler = MemorySampler([process.pid for process in ranks], time.perf_counter())
    sampler.start()
    connections = [parent for parent, _ in pipes]
    gather(connections, ranks)  # all have met
    before, shared_before = sampler.sample(), shared_memory_used()
    for connection in connections:
        connection.send("build")
    build_s = max(gather(connections, ranks))  # all hold the cache
    sampler.sample()
    shared_memory = shared_memory_used() - shared_before
    for connection in connections:
        connection.send("exit")
    for process in ranks:
        process.join()
    sampler.stop.set()
    sampler.join()
    return CacheMeasurement(
        build_s=build_s,
        node_pss_before=1024 * before.pss_kib,
        peak_node_pss=1024 * max(sample.pss_kib for sample in sampler.samples),
        max_rss=1024 * max(sample.max_rss_kib for sample in sampler.samples),
        shared_memory=shared_memory,
    )


def cache_section(args: argparse.Namespace) -> list[str]:
    """The image cache variants; the lines of their table."""
    paths, size = training_paths(args.data_dir), (args.height, args.width)
    copy = cache_nbytes(len(paths), *size)
    lines = []
    for variant in CACHE_VARIANTS:
        figures = measure_cache(variant, paths, size)
        lines.append(
            f"| {variant.name} | {variant.processes} | {figures.build_s:.1f} "
            f"| {variant.copies * copy / GIB:.2f} | {figures.node_pss_before / GIB:.2f} "
            f"| {figures.peak_node_pss / GIB:.2f} "
            f"| {figures.max_rss / GIB:.2f} | {figures.shared_memory / GIB:.2f} |"
        )
        print(f"cache {lines[-1]}", flush=True)
    return [
        f"image cache: {len(paths):,} training images (list_train + list_val less the "
        f"{VAL_IDENTITIES:.0%} held-out identities) at {args.height}×{args.width}: N·3·H·W = "
        f"{copy / GIB:.2f} GiB a copy; one copy per rank (build) or per node (build_per_node)\n",
        "| variant | processes | build s | cache GiB computed | node PSS before GiB | peak node PSS GiB "
        "| peak RSS per rank GiB | /dev/shm GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines,
    ]


def main() -> None:
    args = parse_args()
    machine_line = machine()  # its load average before the runs
    counts = TreeCounts.scaled(args.scale)
    ensure_tree(args.data_dir, counts, args.workers)
    sections = {"runs": runs_section, "cache": cache_section}
    tables = [sections[name](args) for name in args.sections]
    print(f"\n{machine_line}")
    print(f"MSMT17_V1-sized tree, scale {args.scale:g}: {counts.describe()}")
    for table in tables:
        print("\n".join(["", *table]))


if __name__ == "__main__":
    main()
