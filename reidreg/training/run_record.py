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

from reidreg.errors import ConfigError, WriteFailed
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

    def check_same_data(self, provenance: dict[str, Any]) -> None:
        """Refuse to continue this run on a dataset whose listing or content differs from its first start."""
        first, now = self.data.get("provenance", {}).get("dataset", {}), provenance.get("dataset", {})
        changed = [
            key
            for key in sorted(set(first) & set(now))
            if key.endswith(("sha256", "hash")) and first[key] != now[key]
        ]
        if changed:
            raise ConfigError(
                f"the dataset in {now.get('root', '?')} changed since the run in {self.path.parent} started "
                f"({', '.join(f'{key} {first[key][:12]} -> {now[key][:12]}' for key in changed)}); a run "
                "continues on the data it started with: restore that data, or start a new run in its own "
                "directory"
            )

    def start(
        self,
        *,
        provenance: dict[str, Any],
        resumed_from: str | None,
        global_step: int,
        wandb_group: str | None = None,
    ) -> None:
        """Mark the run as running. A resume keeps the first start time, the earlier wall time and the
        first provenance (what changed, such as the host, is noted with the resume). ``wandb_group``: the
        run's W&B group (``reidreg.utils.loggers.wandb_group``), which dashboards select runs by."""
        previous_status = self.data.get("status")
        if resumed_from is None:  # a new run (a run killed before its first resume point starts over)
            self.data, self._previous_wall_time = {}, 0.0
        self.data.setdefault("started_at", _now())
        self.data.setdefault("provenance", provenance)
        self.data.update(status="running", reason=None, ended_at=None)
        if wandb_group is not None:
            self.data["wandb_group"] = wandb_group
        self.data.setdefault("resumes", [])
        if resumed_from is not None:
            resume: dict[str, Any] = {"at": _now(), "ckpt_path": resumed_from, "global_step": global_step}
            changed = {k: v for k, v in provenance.items() if v != self.data["provenance"].get(k)}
            if changed:
                resume["provenance_changes"] = changed
            if previous_status == "running":  # its process is gone: the directory's lock was free
                resume["previous_status"] = "running: its process ended without recording why (killed?)"
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
        try:
            self.write()
        except WriteFailed:  # no room for a second copy: rewrite in place, its blocks are free again
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=2, default=str) + "\n")
