"""The official learning-rate schedule: linear warm-up, step decay with a floor, optional frozen phase."""

import pytest
import torch

from reidreg.training.schedule import set_epoch_lr, warmup_step_lr

OFFICIAL = {
    "base_lr": 2e-4,
    "warmup_epochs": 10,
    "warmup_start_lr": 2e-6,
    "milestones": (40, 70),
    "gamma": 0.1,
}


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, 2e-6),
        (5, 2e-6 + (2e-4 - 2e-6) * 0.5),
        (10, 2e-4),
        (39, 2e-4),
        (40, 2e-5),
        (69, 2e-5),
        (70, 2e-6),
        (200, 2e-6),
    ],
)
def test_official_schedule(epoch, expected):
    assert warmup_step_lr(epoch, **OFFICIAL) == pytest.approx(expected)


def test_floor_and_frozen_phase():
    assert warmup_step_lr(100, **{**OFFICIAL, "milestones": (40, 70, 90)}) == pytest.approx(2e-6)
    assert warmup_step_lr(3, frozen_epochs=20, **OFFICIAL) == pytest.approx(2e-4)
    assert warmup_step_lr(20, frozen_epochs=20, **OFFICIAL) == pytest.approx(2e-6)


def test_set_epoch_lr_keeps_each_groups_base_lr_and_survives_a_state_dict_round_trip():
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.Adam([{"params": [weights[0]], "lr": 2e-4}, {"params": [weights[1]], "lr": 1e-3}])
    schedule = {k: v for k, v in OFFICIAL.items() if k != "base_lr"}
    set_epoch_lr(optimizer, 45, **schedule)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-5, 1e-4])
    restored = torch.optim.Adam([{"params": [weights[0]], "lr": 0.5}, {"params": [weights[1]], "lr": 0.5}])
    restored.load_state_dict(optimizer.state_dict())
    set_epoch_lr(restored, 12, **schedule)
    assert [g["lr"] for g in restored.param_groups] == pytest.approx([2e-4, 1e-3])
