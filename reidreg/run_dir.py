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
    <run_dir>/.run.lock                held by the live run (``RunLock``): one run per directory

Writes are atomic: a temporary file in the same folder, flushed to disk, renamed over the target. A kill
at any moment leaves the old file or the new one, never half of one, and no temporary file survives an
error. This module imports only the standard library (torch loads inside ``read_checkpoint``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from reidreg.errors import ConfigError, WriteFailed

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
    the permissions the umask gives new files (``mkstemp`` alone would make it 0600). A failure of the file
    system (disk full, quota, permissions) is raised as ``WriteFailed``, one line naming the file and the
    free space, even where the writer wrapped it (torch.save reports a full disk as a RuntimeError).
    """
    target = Path(path)
    temporary: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent)
        os.close(descriptor)
        temporary = Path(name)
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        system_error = _os_error_in(error)
        if system_error is None or isinstance(error, WriteFailed):
            raise
        raise WriteFailed(_write_failed_message(target, system_error)) from None


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


class RunLock:
    """The run directory's lock (``LOCK_FILE``): one live run per directory.

    An exclusive ``flock`` on the lock file, held for the life of the process: the kernel releases it when
    the process ends in any way (a crash or SIGKILL included), so a lock is never stale. The file itself
    stays, holding the last owner's pid, host and start time for the message a second run gets.

    A forked child (a DataLoader worker) closes its copy of the descriptor at once: an flock belongs to
    every descriptor that shares it, so a worker that outlives a killed run by its few seconds of watchdog
    interval would otherwise keep the directory locked and refuse the resume typed right after the kill.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = RunDir(run_dir).lock
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``ConfigError`` naming the live run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held open for the life of the run)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise ConfigError(in_use_message(self.path.parent, lock_holder(self.path.parent))) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        file.flush()
        self._file = file
        _HELD_LOCKS.add(self)
        return self

    def release(self) -> None:
        """Release the lock; a directory that holds nothing else (the run failed before it began) goes."""
        if self._file is None:
            return
        if [path.name for path in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.path.parent.rmdir()
        self._file.close()  # closing the only descriptor releases the flock
        self._file = None
        _HELD_LOCKS.discard(self)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


_HELD_LOCKS: set[RunLock] = set()


def _close_inherited_locks() -> None:
    """In a forked child: close the run locks' descriptors (never ``LOCK_UN``: it would unlock the parent)."""
    for lock in _HELD_LOCKS:
        lock._file.close()
        lock._file = None
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The live run holding ``run_dir``'s lock (pid, host, since), or ``None``; creates nothing."""
    path = RunDir(run_dir).lock
    try:
        file = open(path)  # noqa: SIM115
    except FileNotFoundError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(file.read() or "{}")
            except ValueError:
                return {}
    return None


def in_use_message(run_dir: str | Path, holder: dict[str, Any] | None) -> str:
    holder = holder or {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return (
        f"the run directory {run_dir} is in use by a live run (process {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {since}); wait for it to end, or give this run its own directory "
        "(hydra.run.dir)"
    )


#: Set by launchers to a process's rank: Lightning's (``LOCAL_RANK``; ``NODE_RANK`` on other nodes), SLURM
#: (``SLURM_PROCID``), torchrun (``RANK``, ``GROUP_RANK``: its node 1 has ``LOCAL_RANK=0``).
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK", "GROUP_RANK")


def is_secondary_process() -> bool:
    """A process started for another rank of a multi-process run (it shares global rank 0's run directory,
    on another node too: a cluster's run directory is on a shared file system)."""
    return any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES)


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


def _os_error_in(error: BaseException) -> OSError | None:
    """The file-system error that caused ``error`` (itself, or one it was raised from or during)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_failed_message(target: Path, error: OSError) -> str:
    folder = next((p for p in (target.parent, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free / 2**20
    kept = f"the previous {target.name} is unchanged" if target.exists() else f"no {target.name} was written"
    return f"cannot write {target}: {error.strerror} ({free:.1f} MiB free in {folder}); {kept}"


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
