"""The run directory: the names of the files a run writes, how to write any of them, how to read a checkpoint.

Every command that writes or reads a run (training, resume, evaluation, export, provenance, the report)
takes file names and the atomic writer from here, so a run directory has one layout:

.. code-block:: text

    <run_dir>/config.yaml              the resolved config of the run
    <run_dir>/run.json                 status, provenance, cost (``reidreg.training.run_record``)
    <run_dir>/train.log                the console's lines
    <run_dir>/csv/metrics.csv          every logged value by step
    <run_dir>/checkpoints/last.ckpt    the newest resume point; best.ckpt: the best validation score
    <run_dir>/test_metrics.json        the test's metrics; test_per_query.npz: one row per query
    <run_dir>/source.patch             uncommitted changes of the source tree the run used

Writes are atomic: a temporary file in the same folder, flushed to disk, renamed over the target. A kill
at any moment leaves the old file or the new one, never half of one, and no temporary file survives an
error. This module imports only the standard library (torch loads inside ``read_checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from reidreg.errors import ConfigError

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOG_FILE = "train.log"
CSV_METRICS = Path("csv") / "metrics.csv"
CHECKPOINTS_DIR = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
TEST_METRICS_FILE = "test_metrics.json"
PER_QUERY_FILE = "test_per_query.npz"
PATCH_FILE = "source.patch"
LOCK_FILE = ".run.lock"
TEMP_PREFIX = ".tmp-"  # temporary files of atomic writes: ``.tmp-<target name>-<random>``
STORED_CONFIG_KEY = "reidreg_config"  # the run's resolved config inside every checkpoint


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory's files."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG_FILE)
    run_json = property(lambda self: self.root / RUN_FILE)
    log = property(lambda self: self.root / LOG_FILE)
    csv_metrics = property(lambda self: self.root / CSV_METRICS)
    checkpoints = property(lambda self: self.root / CHECKPOINTS_DIR)
    last = property(lambda self: self.root / CHECKPOINTS_DIR / LAST)
    best = property(lambda self: self.root / CHECKPOINTS_DIR / BEST)
    test_metrics = property(lambda self: self.root / TEST_METRICS_FILE)
    per_query = property(lambda self: self.root / PER_QUERY_FILE)
    patch = property(lambda self: self.root / PATCH_FILE)
    lock = property(lambda self: self.root / LOCK_FILE)


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; it replaces ``path`` if the block ends without error.

    For writers that take a file name (exporters, ``np.savez``); it is removed on any error. The file gets
    the permissions the umask gives new files (``mkstemp`` alone would make it 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` when the block ends without error (removed otherwise)."""
    with staged(path) as temporary, open(temporary, "wb") as file:
        yield file


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    with atomic_writer(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def remove_temporaries(folder: str | Path) -> None:
    """Delete temporary files left in ``folder`` by a write that was killed."""
    for path in Path(folder).glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)


def read_checkpoint(path: str | Path, *, option: str = "ckpt_path") -> dict[str, Any]:
    """A ``reidreg.train`` checkpoint, memory-mapped (tensors are read when used); errors name ``option``.

    Besides Lightning's entries it holds the run's resolved config (``STORED_CONFIG_KEY``).
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option}={str(path)!r} does not exist; expected a .ckpt file from reidreg.train.")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # any failure to unpickle means: not a checkpoint we can read
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{option}={str(path)!r} is not a reidreg.train checkpoint (torch.load failed: {reason})."
        ) from None
    if not isinstance(checkpoint, dict) or STORED_CONFIG_KEY not in checkpoint:
        raise ConfigError(f"{option}={str(path)!r} is not a reidreg.train checkpoint (no stored run config).")
    return checkpoint


def stored_config(path: str | Path, *, option: str = "ckpt_path") -> dict[str, Any]:
    """The resolved run config a reidreg checkpoint stores."""
    return read_checkpoint(path, option=option)[STORED_CONFIG_KEY]


def network_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The network's tensors of a checkpoint (``state_dict`` entries ``model.*``, prefix removed)."""
    return {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable (a power cut right after it must not bring the old file back).
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
