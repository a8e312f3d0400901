"""Learning-rate schedule of the AdaptiveReID official code (docs/protocol.md, "Optimisation").

Linear warm-up from ``warmup_start_lr`` to the base lr over ``warmup_epochs``, then the lr is divided by
``1/gamma`` at each milestone epoch, never below ``min_lr``. Epochs are counted from the start of
full-network training: during an optional frozen-backbone phase (``frozen_epochs``) the heads train at the
base lr and the warm-up starts when the backbone is unfrozen.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import torch


def warmup_step_lr(
    epoch: int,
    *,
    base_lr: float,
    warmup_epochs: int = 10,
    warmup_start_lr: float = 2e-6,
    milestones: Sequence[int] = (40, 70),
    gamma: float = 0.1,
    min_lr: float = 2e-6,
    frozen_epochs: int = 0,
) -> float:
    """The learning rate of (0-based) ``epoch``."""
    if epoch < frozen_epochs:
        return base_lr
    epoch -= frozen_epochs
    if epoch < warmup_epochs:
        return warmup_start_lr + (base_lr - warmup_start_lr) * epoch / warmup_epochs
    return max(base_lr * gamma ** bisect_right(sorted(milestones), epoch), min_lr)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, **schedule) -> float:
    """Set every param group's lr for ``epoch`` from its own base lr; returns the first group's lr.

    The lr is a pure function of the epoch (no scheduler state), so a resumed run continues exactly.
    """
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # saved with the optimizer state, so it survives resume
        group["lr"] = warmup_step_lr(epoch, base_lr=group["base_lr"], **schedule)
    return optimizer.param_groups[0]["lr"]
