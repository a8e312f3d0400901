"""The end of ``python -m reidreg.train``: every file of the run listed, and the W&B upload command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import train_command

REPO = Path(__file__).resolve().parents[1]


def test_the_run_lists_every_file_and_how_to_upload_the_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(run_dir, tmp_path.parent / "data", "logger=wandb")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_DIR=str(tmp_path))  # no credentials: offline
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout[done.stdout.rindex("Run directory:") :]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    for name, path in (
        ("log", "train.log"),
        ("run status", "run.json"),
        ("resolved config", "config.yaml"),
        ("CSV metrics", "csv/metrics.csv"),
        ("checkpoints", "checkpoints"),
        ("test metrics", "test_metrics.json"),
    ):
        assert f"  {name:16s} {run_dir / path}\n" in summary, name
    assert f"  {'W&B run':16s} {wandb_run}\n" in summary
    assert f"  {'upload it with':16s} wandb sync {wandb_run}\n" in summary
