"""Check, before the first training step, that every image of the splits in use decodes fully.

Why: a corrupt file is otherwise found when a loader worker first reads it — on MSMT17 possibly hours into
a run — and reported inside a long DataLoader worker traceback. Here every image is opened with PIL and
fully decoded (``Image.load()``), so a truncated JPEG, an empty file, a file that is no image and a file
that disappeared all fail at once, in one :class:`DatasetError` line that names the file.

* Truncation: PIL refuses a truncated image unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, in
  which case it silently fills the missing rows with grey. reidreg never sets it; the check forces it off
  while it runs, so a library that switched it on cannot hide a truncated file from the check.
* Parallel: a thread pool (``workers``, by default one thread per usable CPU). PIL's C decoder releases
  the GIL, and decoding is most of the work (about 250 of 320 µs CPU per 128×64 JPEG; the header parse,
  in Python, holds the GIL); threads avoid a process pool's start-up, pickling and forking of a process
  that already runs torch threads. ``benchmarks/image_check.py`` compares serial, threads and processes.
* Cached: a manifest ``<cache_dir>/<dataset folder name>.json`` maps each verified image, by its path
  relative to the dataset folder, to its size and modification time. A second run only stats the files;
  a file whose size or mtime changed is decoded again. Broken files are never cached. If the cache cannot
  be written (a read-only data folder), the images are still checked, and a note on stderr says so once.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from reidreg.data.datasets import DatasetError
from reidreg.run_dir import atomic_write

CACHE_VERSION = 1
NUM_LISTED = 5  # broken files named in the error besides the first
_CHUNK = 128  # files per pool task: few enough tasks to keep the overhead small, enough for the bar

# (size in bytes, mtime in ns): a file with the same signature as when it was verified is not decoded again.
Signature = tuple[int, int]


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_images` did: ``decoded`` + ``cached`` = ``total`` images, all of them good."""

    total: int
    decoded: int
    cached: int
    workers: int
    seconds: float
    cache_file: Path | None  # the manifest read and (if needed) written; None without caching
    cache_problem: str | None  # why the manifest could not be written, if it could not

    def summary(self) -> str:
        text = (
            f"image check: {self.total:,} images OK ({self.decoded:,} decoded, {self.cached:,} unchanged "
            f"since verified; {self.workers} threads, {self.seconds:.2f} s)"
        )
        if self.cache_problem:
            return f"{text}; not cached"
        return f"{text}; cache {self.cache_file}" if self.cache_file else text


@dataclass(frozen=True)
class _Outcome:
    signature: Signature | None  # None: the file could not be stat'ed
    problem: str | None  # None: the image is good
    decoded: bool  # False: skipped, unchanged since verified


def _decode_problem(path: str) -> str | None:
    """Why ``path`` does not decode fully with PIL, or None if it does."""
    try:
        with Image.open(path) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"corrupt or truncated image: {error}"
    return None


def _check(path: str, verified: Signature | None) -> _Outcome:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return _Outcome(None, "file not found", decoded=False)
    except OSError as error:
        return _Outcome(None, f"unreadable: {error.strerror}", decoded=False)
    signature = (status.st_size, status.st_mtime_ns)
    if signature == verified:
        return _Outcome(signature, None, decoded=False)
    if not stat.S_ISREG(status.st_mode):
        return _Outcome(signature, "not a regular file", decoded=True)
    if status.st_size == 0:
        return _Outcome(signature, "empty file (0 bytes)", decoded=True)
    return _Outcome(signature, _decode_problem(path), decoded=True)


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _cache_key(path: str, root: Path) -> str:
    """The path relative to the dataset folder (so the cache survives moving it), else the path itself."""
    relative = os.path.relpath(path, root)
    return path if relative.startswith("..") else relative


def _read_manifest(cache_file: Path) -> dict[str, Signature]:
    """The verified images of ``cache_file``; empty if it is missing, unreadable or of another version."""
    try:
        content = json.loads(cache_file.read_text())
        if content.get("version") != CACHE_VERSION:
            return {}
        return {key: (int(size), int(mtime)) for key, (size, mtime) in content["images"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_manifest(cache_file: Path, images: dict[str, Signature]) -> None:
    """Write atomically, with the umask's permissions, as the data files."""
    atomic_write(cache_file, json.dumps({"version": CACHE_VERSION, "images": dict(sorted(images.items()))}))


def _broken_message(broken: list[tuple[str, str]], total: int) -> str:
    (first, problem), others = broken[0], broken[1:]
    message = f"broken image {first}: {problem}"
    if others:
        listed = ", ".join(f"{path} ({problem})" for path, problem in others[:NUM_LISTED])
        more = f" and {len(others) - NUM_LISTED:,} more" if len(others) > NUM_LISTED else ""
        message += f"; {len(others):,} more of the {total:,} images are broken: {listed}{more}"
    return f"{message}. Replace or remove the broken files before training."


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None,
    workers: int | None = None,
    progress: bool = True,
) -> VerifyResult:
    """Decode every image of ``paths`` fully; raise one :class:`DatasetError` line if any is broken.

    ``root`` is the dataset folder: cache keys are paths relative to it. ``cache_dir`` holds the manifest
    ``<root name>.json`` (None: no caching). ``workers``: threads, by default one per usable CPU.
    ``progress``: a rich progress bar while checking when stdout is a terminal, then one summary line
    (only the line when it is not); False prints nothing. A cache that cannot be written is reported once,
    on stderr. The manifest keeps the good images even when some are broken, so that a rerun after fixing
    them decodes only the changed files.
    """
    start = time.perf_counter()
    workers = _usable_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root).absolute()
    files = list(dict.fromkeys(os.fspath(path) for path in paths))  # unique, in order
    keys = [_cache_key(path, root) for path in files]
    cache_file = Path(cache_dir) / f"{root.name}.json" if cache_dir is not None else None
    manifest = _read_manifest(cache_file) if cache_file else {}

    outcomes: list[_Outcome] = []
    with _truncated_images_refused(), ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = [range(index, min(index + _CHUNK, len(files))) for index in range(0, len(files), _CHUNK)]
        results = pool.map(lambda chunk: [_check(files[i], manifest.get(keys[i])) for i in chunk], chunks)
        for chunk_outcomes in _with_progress(results, len(files), enabled=progress):
            outcomes.extend(chunk_outcomes)

    broken = [(path, o.problem) for path, o in zip(files, outcomes, strict=True) if o.problem is not None]
    decoded = sum(o.decoded for o in outcomes)
    cache_problem = None
    if cache_file is not None:
        updated = dict(manifest)
        for key, outcome in zip(keys, outcomes, strict=True):
            if outcome.problem is None and outcome.signature is not None:
                updated[key] = outcome.signature
            else:
                updated.pop(key, None)
        if updated != manifest:
            try:
                _write_manifest(cache_file, updated)
            except OSError as error:
                cache_problem = (
                    f"cannot write the image check cache {cache_file} ({error.strerror or error}): "
                    "images were verified without caching and will be decoded again next run"
                )
                print(cache_problem, file=sys.stderr)
    if broken:
        raise DatasetError(_broken_message(broken, len(files)))
    result = VerifyResult(
        total=len(files),
        decoded=decoded,
        cached=len(files) - decoded,
        workers=workers,
        seconds=time.perf_counter() - start,
        cache_file=cache_file if cache_problem is None else None,
        cache_problem=cache_problem,
    )
    if progress:
        print(result.summary())
    return result


def _with_progress(
    chunks: Iterator[list[_Outcome]], total: int, *, enabled: bool
) -> Iterator[list[_Outcome]]:
    """Yield ``chunks``, advancing a transient rich bar when ``enabled`` and stdout is a terminal."""
    if not (enabled and sys.stdout.isatty()):
        yield from chunks
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("image check"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("image check", total=total)
        for chunk in chunks:
            bar.advance(task, len(chunk))
            yield chunk
