"""An exclusive ``flock`` on a lock file, shared by the writers that must not work at the same time (the
synthetic generator, the node image cache's clean-up)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``lock_path`` (created if missing); yields whether it is locked.

    Without lock support (some network file systems) it goes on unlocked: the caller decides what is still
    safe. The kernel releases the lock of a killed process. The lock file stays: removing it would race. A
    lock file created by another user may be read-only to us: flock works on a read-only descriptor too.
    """
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        lock_fd = os.open(lock_path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
    finally:
        os.close(lock_fd)
