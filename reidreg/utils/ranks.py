"""The ranks a launcher started for a multi-process (DDP) run: bound to the main process, and quiet.

Lightning's DDP launcher runs ranks 1..N-1 of a node as copies of the command, with ``LOCAL_RANK`` set;
the main process is rank 0. Two things make such a run behave as one process to its user:

* **They die with the main process.** Killed (SIGKILL, the OOM killer), the main process can neither stop
  them nor say goodbye, and a rank waiting in a collective would wait for the collective's timeout. Linux's
  parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) makes the kernel kill the rank the moment its
  parent exits, whatever the reason: no thread, no polling. Set as the rank starts, before torch loads; a
  parent killed before that (a second or so) leaves the rank to the collective's timeout, as before.
  Elsewhere than on Linux nothing is set.
* **They print nothing that rank 0 prints** (every process other than global rank 0,
  ``reidreg.run_dir.is_secondary_process``). Their standard output is discarded and their log records
  below ERROR are dropped: the dataset table, the progress, the warnings and the one-line reason a run
  stopped appear once; a rank's own error (ERROR records, tracebacks on stderr) still shows.

Standard library only (and ``reidreg.run_dir``): called from ``reidreg.train.main`` before torch is imported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from reidreg.run_dir import is_secondary_process

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def follow_main_process() -> None:
    """In a rank a launcher started: die with the main process; print only what rank 0 would not."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if is_secondary_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
        for handler in logging.getLogger().handlers:
            handler.setLevel(max(handler.level, logging.ERROR))
