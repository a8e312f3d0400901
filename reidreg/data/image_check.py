"""Check, before the first training step, that every image of the splits in use decodes fully and can
become 8-bit RGB; name the images far below the training size; hash the dataset's content.

Why: a corrupt file is otherwise found when a loader worker first reads it — on MSMT17 possibly hours into
a run — and reported inside a long DataLoader worker traceback. Here every image is opened with PIL and
fully decoded (``Image.load()``), so a truncated JPEG, an empty file, a file that is no image, a file that
disappeared and an image whose pixel mode has no conversion to 8-bit RGB (``reidreg.data.image_modes``:
32-bit ``I`` or float ``F``) all fail at once, in one :class:`DatasetError` line that names the file.

* Truncation: PIL refuses a truncated image unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, in
  which case it silently fills the missing rows with grey. reidreg never sets it; the check forces it off
  while it runs, so a library that switched it on cannot hide a truncated file from the check.
* Small images: an image smaller than 1/:data:`SMALL_IMAGE_FACTOR` of the training height or width would
  be stretched more than that factor by the resize; they are named (count, first few, sizes) in one
  warning, not refused (a few tiny crops are common in real datasets).
* Content hash: each file's bytes are read once, hashed (SHA-256) and decoded from memory. The dataset's
  ``content_hash`` is the SHA-256 of the sorted (relative path, SHA-256 of the bytes) pairs of every
  image checked: equal hashes mean the same files with the same bytes. With the check switched off
  (``decode=False``) the files are still read and hashed, not decoded, so every run has a hash.
* Parallel: a thread pool (``workers``, by default one thread per usable CPU). PIL's C decoder and hashlib
  release the GIL, and decoding is most of the work (about 250 of 320 µs CPU per 128×64 JPEG; the header
  parse, in Python, holds the GIL); threads avoid a process pool's start-up, pickling and forking of a
  process that already runs torch threads. ``benchmarks/image_check.py`` compares serial, threads and
  processes.
* Cached: a manifest ``<cache_dir>/<dataset folder name>.json`` maps each image, by its path relative to
  the dataset folder, to its size and modification time (ns), its height and width (None if only hashed)
  and the SHA-256 of its bytes. A second run only stats the files: a file whose size or mtime changed is
  read again. Like rsync's quick check, a file rewritten with the same size and its old mtime restored
  (``touch -d``, ``os.utime``) is not noticed: its old verdict and hash are kept until the cache file is
  deleted. Broken files are never cached. If the cache cannot be written (a read-only data folder), the
  images are still checked, and a note on stderr says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from reidreg.data.datasets import DatasetError
from reidreg.data.image_modes import unsupported_mode
from reidreg.errors import WriteFailed
from reidreg.run_dir import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 2
NUM_LISTED = 5  # broken or small files named in a message besides the first
SMALL_IMAGE_FACTOR = 4  # an image below 1/4 of the training height or width is named in a warning
_CHUNK = 128  # files per pool task: few enough tasks to keep the overhead small, enough for the bar


class Entry(NamedTuple):
    """What the check knows of one good image; an unchanged (size, mtime) means it is not read again."""

    size: int  # bytes
    mtime_ns: int
    height: int | None  # None: hashed, not decoded (the check was switched off)
    width: int | None
    sha256: str  # of the file's bytes, hex


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_images` did: ``read`` + ``cached`` = ``total`` images, all of them good.

    ``decode``: whether images were decoded (the check) or only hashed. ``small_images``: (path, height,
    width) of the images below 1/``SMALL_IMAGE_FACTOR`` of the training size, in the order given.
    """

    total: int
    read: int
    cached: int
    decode: bool
    workers: int
    seconds: float
    cache_file: Path | None  # the manifest read and (if needed) written; None without caching
    cache_problem: str | None  # why the manifest could not be written, if it could not
    content_hash: str  # SHA-256 of the sorted (relative path, SHA-256 of the bytes) pairs, hex
    small_images: tuple[tuple[str, int, int], ...] = ()

    def summary(self) -> str:
        if self.decode:
            text = f"image check: {self.total:,} images OK ({self.read:,} decoded, "
        else:
            text = f"image hash (image check off): {self.total:,} images ({self.read:,} read, "
        text += (
            f"{self.cached:,} unchanged since verified; {self.workers} threads, {self.seconds:.2f} s); "
            f"content {self.content_hash[:12]}"
        )
        if self.cache_problem:
            return f"{text}; not cached"
        return f"{text}; cache {self.cache_file}" if self.cache_file else text


@dataclass(frozen=True)
class _Outcome:
    entry: Entry | None  # None: the file is broken
    problem: str | None  # None: the image is good
    read: bool  # False: skipped, unchanged since verified


def _decode(data: bytes) -> tuple[int, int, str | None]:
    """(height, width, why the image is unusable or None) of an image file's bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.height, image.width, unsupported_mode(image)
    except UnidentifiedImageError:
        return 0, 0, "not an image PIL can identify"
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return 0, 0, f"corrupt or truncated image: {error}"


def _check(path: str, known: Entry | None, decode: bool) -> _Outcome:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return _Outcome(None, "file not found", read=False)
    except OSError as error:
        return _Outcome(None, f"unreadable: {error.strerror}", read=False)
    if (
        known is not None
        and (known.size, known.mtime_ns) == (status.st_size, status.st_mtime_ns)
        and (known.height is not None or not decode)
    ):
        return _Outcome(known, None, read=False)
    if not stat.S_ISREG(status.st_mode):
        return _Outcome(None, "not a regular file", read=True)
    if status.st_size == 0:
        return _Outcome(None, "empty file (0 bytes)", read=True)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        return _Outcome(None, f"unreadable: {error.strerror}", read=True)
    digest = hashlib.sha256(data).hexdigest()
    height = width = problem = None
    if decode:
        height, width, problem = _decode(data)
    if problem is not None:
        return _Outcome(None, problem, read=True)
    return _Outcome(Entry(status.st_size, status.st_mtime_ns, height, width, digest), None, read=True)


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _cache_keys(paths: Sequence[str], root: Path) -> list[str]:
    """Each path relative to the dataset folder, with ``/`` (so the cache and the content hash survive
    moving it), else the path itself. A plain prefix cut for the usual absolute path below ``root``:
    ``os.path.relpath`` costs more than the rest of a warm run."""
    prefix = os.path.join(root, "")
    keys = []
    for path in paths:
        relative = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
        keys.append(path if relative.startswith("..") else relative.replace(os.sep, "/"))
    return keys


def _read_manifest(cache_file: Path) -> dict[str, Entry]:
    """The known images of ``cache_file``; empty if it is missing, unreadable or of another version."""
    try:
        content = json.loads(cache_file.read_text())
        if content.get("version") != CACHE_VERSION:
            return {}
        return {key: _entry(fields) for key, fields in content["images"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _entry(fields: list) -> Entry:
    """An ``Entry`` from the manifest's JSON list; ``TypeError``/``ValueError`` if it is malformed. (A
    size or mtime of another type never equals the file's: that file is just read again.)"""
    entry = Entry._make(fields)  # TypeError unless 5 fields
    if not (isinstance(entry.sha256, str) and len(entry.sha256) == 64):
        raise ValueError(f"not a SHA-256: {entry.sha256!r}")
    return entry


def _write_manifest(cache_file: Path, images: dict[str, Entry]) -> None:
    """Write atomically, with the umask's permissions, as the data files."""
    atomic_write(cache_file, json.dumps({"version": CACHE_VERSION, "images": dict(sorted(images.items()))}))


def content_hash(digests: dict[str, str]) -> str:
    """SHA-256 over the (relative path, SHA-256 of the bytes) pairs, sorted by path: the identity of a
    dataset's content. Paths end with a NUL and digests have a fixed size, so the encoding is unambiguous."""
    combined = hashlib.sha256()
    for key in sorted(digests):
        combined.update(key.encode() + b"\0" + bytes.fromhex(digests[key]))
    return combined.hexdigest()


def _broken_message(broken: list[tuple[str, str]], total: int) -> str:
    (first, problem), others = broken[0], broken[1:]
    message = f"broken image {first}: {problem}"
    if others:
        listed = ", ".join(f"{path} ({problem})" for path, problem in others[:NUM_LISTED])
        more = f" and {len(others) - NUM_LISTED:,} more" if len(others) > NUM_LISTED else ""
        message += f"; {len(others):,} more of the {total:,} images are broken: {listed}{more}"
    return f"{message}. Replace or remove the broken files before training."


def small_images_warning(small: Sequence[tuple[str, int, int]], total: int, size: tuple[int, int]) -> str:
    """One line: how many images are below 1/``SMALL_IMAGE_FACTOR`` of ``size`` (height, width), the first
    ``NUM_LISTED`` with their sizes."""
    listed = ", ".join(f"{path} ({height}x{width})" for path, height, width in small[:NUM_LISTED])
    more = f" and {len(small) - NUM_LISTED:,} more" if len(small) > NUM_LISTED else ""
    return (
        f"{len(small):,} of the {total:,} images are smaller than 1/{SMALL_IMAGE_FACTOR} of the training "
        f"size {size[0]}x{size[1]} (height x width) and will be stretched more than {SMALL_IMAGE_FACTOR}x: "
        f"{listed}{more}"
    )


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None,
    training_size: tuple[int, int] | None = None,
    decode: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> VerifyResult:
    """Decode every image of ``paths`` fully; raise one :class:`DatasetError` line if any is unusable.

    ``root`` is the dataset folder: cache keys and hashed paths are relative to it. ``cache_dir`` holds the
    manifest ``<root name>.json`` (None: no caching). ``training_size``: (height, width) the images are
    resized to; images below 1/``SMALL_IMAGE_FACTOR`` of it are named in one warning (logged). ``decode``
    False: only read and hash the files (the check switched off; no error but a missing or unreadable
    file). ``workers``: threads, by default one per usable CPU. ``progress``: a rich progress bar while
    checking when stdout is a terminal, then one summary line (only the line when it is not); False prints
    nothing. A cache that cannot be written is reported once, on stderr. The manifest keeps the good images
    even when some are broken, so that a rerun after fixing them reads only the changed files.
    """
    start = time.perf_counter()
    workers = _usable_cpus() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root).absolute()
    files = list(dict.fromkeys(os.fspath(path) for path in paths))  # unique, in order
    keys = _cache_keys(files, root)
    cache_file = Path(cache_dir) / f"{root.name}.json" if cache_dir is not None else None
    manifest = _read_manifest(cache_file) if cache_file else {}

    outcomes: list[_Outcome] = []
    with _truncated_images_refused(), ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = [range(index, min(index + _CHUNK, len(files))) for index in range(0, len(files), _CHUNK)]
        results = pool.map(
            lambda chunk: [_check(files[i], manifest.get(keys[i]), decode) for i in chunk], chunks
        )
        for chunk_outcomes in _with_progress(results, len(files), enabled=progress):
            outcomes.extend(chunk_outcomes)

    broken = [(path, o.problem) for path, o in zip(files, outcomes, strict=True) if o.problem is not None]
    read = sum(o.read for o in outcomes)
    cache_problem = None
    if cache_file is not None:
        updated = dict(manifest)
        for key, outcome in zip(keys, outcomes, strict=True):
            if outcome.entry is not None:
                updated[key] = outcome.entry
            else:
                updated.pop(key, None)
        if updated != manifest:
            try:
                _write_manifest(cache_file, updated)
            except (OSError, WriteFailed) as error:  # atomic_write reports file-system errors as WriteFailed
                reason = getattr(error, "strerror", None) or error
                cache_problem = (
                    f"cannot write the image check cache {cache_file} ({reason}): "
                    "images were checked without caching and will be read again next run"
                )
                print(cache_problem, file=sys.stderr)
    if broken:
        raise DatasetError(_broken_message(broken, len(files)))
    entries = [outcome.entry for outcome in outcomes]
    small = ()
    if decode and training_size is not None:
        min_height, min_width = (side / SMALL_IMAGE_FACTOR for side in training_size)
        small = tuple(
            (path, entry.height, entry.width)
            for path, entry in zip(files, entries, strict=True)
            if entry.height < min_height or entry.width < min_width
        )
        if small:
            log.warning(small_images_warning(small, len(files), training_size))
    result = VerifyResult(
        total=len(files),
        read=read,
        cached=len(files) - read,
        decode=decode,
        workers=workers,
        seconds=time.perf_counter() - start,
        cache_file=cache_file if cache_problem is None else None,
        cache_problem=cache_problem,
        content_hash=content_hash({key: entry.sha256 for key, entry in zip(keys, entries, strict=True)}),
        small_images=small,
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
