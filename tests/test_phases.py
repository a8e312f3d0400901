"""A real signal at every phase of a run, then the same command again: the same run as if never stopped.

SIGKILL or SIGTERM (sent by the run to itself at a chosen hook, ``tests.phase_signals``) mid-epoch, in the
last step of an epoch, at the epoch end, during a validation, during a checkpoint write and during the
test; the same command started again in the run directory resumes. ``best.ckpt`` and ``last.ckpt``
(every tensor), the CSV history and the test metrics must equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import phase_signals
from tests.test_resume import RUN, cli

PHASED_RUN = [o for o in RUN if o != "test=false"]  # 3 epochs of 8 steps, validation every epoch, the test
PHASES = {  # hook, call: where the signal arrives
    "mid_epoch": ("on_train_batch_start", 11),  # the 3rd step of epoch 2
    "last_step_of_an_epoch": ("on_train_batch_start", 16),
    "epoch_end": ("on_train_epoch_end", 2),  # before the epoch's resume point is written
    "validation": ("on_validation_batch_start", 2),
    "checkpoint_write": ("checkpoint_write", 5),  # in the middle of writing a resume point
    "test": ("on_test_batch_start", 1),
}
FAST = {("validation", "SIGTERM"), ("test", "SIGTERM")}


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_identical(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def best_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("BestCheckpoint"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        a, b = load(reference / "checkpoints" / name), load(run_dir / "checkpoints" / name)
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step"):
            assert_identical(a[key], b[key], f"{name}:{key}")
    reference_best, best = (
        best_state(load(reference / "checkpoints" / "last.ckpt")),
        best_state(load(run_dir / "checkpoints" / "last.ckpt")),
    )
    assert float(best["best_model_score"]) == float(reference_best["best_model_score"])
    assert Path(best["best_model_path"]) == run_dir / "checkpoints" / "best.ckpt"
    assert csv_rows(run_dir) == csv_rows(reference)
    assert (
        json.loads((run_dir / "test_metrics.json").read_text())["test/mAP"]
        == json.loads((reference / "test_metrics.json").read_text())["test/mAP"]
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run (and the shared data folder)."""
    base = tmp_path_factory.mktemp("phases")
    result = cli(base / "reference", *PHASED_RUN, data_dir=base / "data")
    assert result.returncode == 0, result.stderr
    return base / "reference", base / "data"


@pytest.mark.parametrize(
    ("phase", "signal_name"),
    [
        pytest.param(
            phase, name, marks=() if (phase, name) in FAST else pytest.mark.slow, id=f"{phase}-{name}"
        )
        for phase in PHASES
        for name in ("SIGTERM", "SIGKILL")
    ],
)
def test_a_signal_at_any_phase_then_the_same_command_gives_the_uninterrupted_run(
    tmp_path, reference, phase, signal_name
):
    reference_dir, data_dir = reference
    run_dir = tmp_path / "run"
    hook, call = PHASES[phase]
    plugin = phase_signals.install(tmp_path / "plugin")
    stopped = cli(
        run_dir,
        *PHASED_RUN,
        data_dir=data_dir,
        env=phase_signals.environment(plugin, hook, call, signal_name),
    )
    status = json.loads((run_dir / "run.json").read_text())
    if signal_name == "SIGKILL":
        assert stopped.returncode == -9 and status["status"] == "running"
    else:
        assert stopped.returncode == 4, stopped.stderr
        lines = stopped.stderr.strip().splitlines()
        assert lines == [f"error: {status['reason']}"] and "received SIGTERM" in lines[0]
        assert status["status"] == "interrupted"
        if phase == "test":
            assert "during the test" in status["reason"]
    # Every resume point holds the best of the validations before it.
    stored = load(run_dir / "checkpoints" / "last.ckpt")
    scores = [
        float(r["val/mAP"])
        for r in csv_rows(run_dir)
        if "val/mAP" in r and int(r["step"]) < stored["global_step"]
    ]
    if scores:
        assert float(best_state(stored)["best_model_score"]) == max(scores)

    resumed = cli(run_dir, *PHASED_RUN, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 1
    if phase == "test":
        assert record["resumes"][0]["global_step"] == 24  # training was complete: the resume only tests
