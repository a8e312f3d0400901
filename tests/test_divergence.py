"""Divergence is not a result: a blown-up run stops at once, says why, and is marked diverged on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reidreg.errors import TrainingDiverged
from reidreg.training.callbacks.divergence import DivergenceGuard
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


class FakeTrainer:
    """What the guard reads from a Trainer."""

    def __init__(self) -> None:
        self.global_step, self.current_epoch, self.world_size, self.precision = 0, 0, 1, "32-true"
        self.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)]


class FakeModule:
    last_step_loss: torch.Tensor | None = None


def run_steps(guard: DivergenceGuard, losses: list[float]) -> None:
    trainer, module = FakeTrainer(), FakeModule()
    guard.on_fit_start(trainer, module)
    for loss in losses:
        trainer.global_step += 1
        module.last_step_loss = torch.tensor(loss)
        guard.on_train_batch_end(trainer, module)
    guard.on_train_epoch_end(trainer, module)


def test_a_normal_noisy_run_passes():
    run_steps(DivergenceGuard(factor=10, reference_steps=5, check_every_n_steps=3), [8, 9, 7, 8, 8, 20, 3, 1])


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ([8, 8, float("nan"), 8], r"step 2 \(epoch 0\): the loss is nan; lower optim.optimizer.lr"),
        ([8, 8, float("inf"), 8], r"step 2 .*the loss is inf"),
        ([8] * 5 + [81, 8], r"step 5 .*the loss 81 is over divergence.factor=10 times its early level 8"),
    ],
)
def test_non_finite_or_exploding_loss_stops_the_run_naming_the_first_bad_step(losses, message):
    with pytest.raises(TrainingDiverged, match=message):
        run_steps(DivergenceGuard(factor=10, reference_steps=5, check_every_n_steps=100), losses)


def test_no_checkpoint_is_assembled_from_a_diverged_state():
    guard, trainer, module = DivergenceGuard(reference_steps=2), FakeTrainer(), FakeModule()
    module.last_step_loss = torch.tensor(float("nan"))
    trainer.global_step = 1
    guard.on_train_batch_end(trainer, module)  # not a check step: the verdict waits on the device
    with pytest.raises(TrainingDiverged):
        guard.on_save_checkpoint(trainer, module, {})


def test_non_finite_gradients_stop_the_run_except_under_16_bit_scaling():
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.tensor([0.0, float("inf"), 1.0])
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    for precision, stops in (("32-true", True), ("bf16-mixed", True), ("16-mixed", False)):
        guard, trainer = DivergenceGuard(), FakeTrainer()
        trainer.precision = precision
        guard.on_fit_start(trainer, FakeModule())
        guard.on_before_optimizer_step(trainer, FakeModule(), optimizer)
        if stops:
            with pytest.raises(TrainingDiverged, match="gradients are not finite"):
                guard.raise_if_diverged(trainer)
        else:
            guard.raise_if_diverged(trainer)


def test_cli_diverged_run_exits_non_zero_in_one_line_and_is_marked_diverged(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        *TINY_OVERRIDES,
        "optim.optimizer.lr=1e6",
        "optim.schedule.warmup_epochs=0",
        f"paths.data_dir={tmp_path.parent / 'data'}",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step"), result.stderr
    assert "Traceback" not in result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "diverged" and "diverged" in record["reason"]
    assert not (run_dir / "test_metrics.json").exists()
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()
