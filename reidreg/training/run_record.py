"""``<run_dir>/run.json``: what a run is (status), what produced it (provenance) and what it cost.

Written when training starts (``status: running``), on every resume (appended to ``resumes``), and when the
run ends: ``finished``, ``failed`` (an error), ``diverged`` (the divergence guard stopped it) or
``interrupted`` (a signal; resume it from ``checkpoints/last.ckpt``). ``reidreg.report`` averages only
finished runs and lists the others with their status and reason. The file is replaced atomically, so a
reader never sees half of it.
"""

from __future__ import annotations

import json
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
        self.data.update(status="running", reason=None, ended_at=None, provenance=provenance)
        self.data.setdefault("resumes", [])
        if resumed_from is not None:
            self.data["resumes"].append({"at": _now(), "ckpt_path": resumed_from, "global_step": global_step})
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
