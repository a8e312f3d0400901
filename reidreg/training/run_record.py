"""``<run_dir>/run.json``: what a run is (status), what produced it (provenance) and what it cost.

Written when training starts (``status: running``), on every resume (appended to ``resumes``), and when the
run ends: ``finished``, ``failed`` (an error), ``diverged`` (the divergence guard stopped it) or
``interrupted`` (a signal; resume it from ``checkpoints/last.ckpt``). ``reidreg.report`` averages only
finished runs and lists the others with their status and reason. The file is replaced atomically, so a
reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reidreg.run_dir import RUN_FILE, atomic_write


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunRecord:
    """Reads, updates and atomically rewrites one run's ``run.json``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RUN_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self._started = time.monotonic()
        self._previous_wall_time = float(self.data.get("wall_time_s") or 0.0)

    def start(self, *, provenance: dict[str, Any], resumed_from: str | None, global_step: int) -> None:
        """Mark the run as running; a resume keeps the first start time and the earlier wall time."""
        self.data.setdefault("started_at", _now())
        ended = {"status": self.data.get("status"), "reason": self.data.get("reason")}  # how it stopped
        self.data.update(status="running", reason=None, ended_at=None, provenance=provenance)
        self.data.update(pid=os.getpid(), host=socket.gethostname())  # who runs it (mark_stale_run)
        self.data.setdefault("resumes", [])
        if resumed_from is not None:
            resume = {"at": _now(), "ckpt_path": resumed_from, "global_step": global_step, "after": ended}
            self.data["resumes"].append(resume)
        self.write()

    def finish(
        self, status: str, *, reason: str | None = None, performance: dict[str, Any] | None = None
    ) -> None:
        self.data.update(
            status=status,
            reason=reason,
            ended_at=_now(),
            wall_time_s=round(self._previous_wall_time + time.monotonic() - self._started, 1),
        )
        if performance is not None:
            self.data["performance"] = performance
        self.write()

    def write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def mark_stale_run(run_dir: str | Path) -> bool:
    """Record as ``interrupted`` a run that ``run.json`` says is running but whose process is gone.

    A process killed outright (SIGKILL, the OOM killer, a lost node) cannot update ``run.json``. Called
    before a run starts in ``run_dir``: if the recorded process (``pid`` on ``host``, this host) no longer
    exists, the record says so. True if it was stale. A run recorded on another host is left as it is.
    """
    record = RunRecord(run_dir)
    pid, host = record.data.get("pid"), record.data.get("host")
    if record.data.get("status") != "running" or pid is None or host != socket.gethostname():
        return False
    if _process_exists(int(pid)) and int(pid) != os.getpid():
        return False
    record.data.update(
        status="interrupted",
        reason=f"its process (pid {pid} on {host}) ended without recording why (killed?)",
        ended_at=record.data.get("ended_at") or _now(),
    )
    record.write()
    return True


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
