"""Adversarial training (AT), an input transform: the explicit, directional baseline that SGP argues against.

Madry et al. ("Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018) train on the worst
case in an ε-ball, min_θ E[max_{‖δ‖∞≤ε} J(θ, x + δ, y)]; the inner maximisation is approximated by FGSM or
PGD (``reidreg.attacks``, which states the update rule). Here J is the ReID task loss of the batch,
``ctx.loss(ctx.model(x), labels)["total"]`` (label-smoothed CE + batch-hard triplet of every objective
module), and δ lives in the pixel space of the un-normalised image ([0, 1], ε = 8/255 by default).

Mixing (our choice, configurable): a fraction ``adv_fraction`` of the batch is replaced by its
adversarial version, the same share of every identity's images (round(adv_fraction · K) of K, chosen at
random), so the batch keeps its P × K structure: every identity has clean and adversarial images, and the
triplet loss compares them. The attack maximises the loss of the *whole* batch as it will be trained on
(the clean images take part unchanged), which is the ``replace`` mixing of the AT literature. Appending
the adversarial copies instead (``concat``, doubling the batch, labels repeated) is not implemented.

BatchNorm during the attack: the attack runs in the network's current (train) mode, so it attacks the
same function the step trains — batch statistics — but the running statistics are frozen: every
BatchNorm's ``track_running_stats`` is switched off for the attack's forward passes (batch statistics are
used and neither the running mean/var nor ``num_batches_tracked`` change), then restored. Only the
training forward updates them, exactly once per step, as without AT.

Cost: ``steps`` extra forward and backward passes per training step (the point SGP makes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from reidreg.attacks import ATTACK_NAMES, build_attack
from reidreg.options.rules import boolean, choice, integer, number, optional
from reidreg.regularizers.base import LogDict, Regularizer, StepContext
from reidreg.regularizers.random_streams import step_generator


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics (and ``num_batches_tracked``) unchanged inside."""
    tracking = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for bn in tracking:
        # In train mode this normalises with batch statistics and skips the running-stat update; in eval
        # mode the existing running statistics are still used (PyTorch's BatchNorm forward).
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in tracking:
            bn.track_running_stats = True


def choose_per_identity(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask with round(fraction · K_i) random samples of every identity i (K_i = its count)."""
    scores = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    same_identity = labels[:, None] == labels[None, :]
    rank_in_identity = (same_identity & (scores[None, :] < scores[:, None])).sum(1)
    # floor(x + 0.5): round half up (torch.round would round 0.5·3 = 1.5 to 2 but 0.5·1 = 0.5 to 0).
    chosen_count = torch.floor(fraction * same_identity.sum(1) + 0.5)
    return rank_in_identity < chosen_count


class AdversarialTraining(Regularizer):
    """Replace ``adv_fraction`` of every identity's training images by FGSM/PGD adversarial examples."""

    OPTION_RULES = {
        "attack": choice(*ATTACK_NAMES),
        "eps": number(ge=0),
        "step_size": optional(number(ge=0)),
        "steps": optional(integer(min=1)),
        "random_start": boolean(),
        "adv_fraction": number(ge=0, le=1),
        "seed": integer(),
    }

    def __init__(
        self,
        *,
        attack: str = "pgd",
        eps: float = 8 / 255,
        step_size: float | None = None,
        steps: int | None = None,
        random_start: bool = True,
        adv_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.attack = build_attack(
            attack, eps=eps, step_size=step_size, steps=steps, random_start=random_start
        )
        self.attack_name, self.adv_fraction, self.seed = attack, adv_fraction, seed

    def transform_inputs(
        self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LogDict]:
        model = ctx.model
        generator = step_generator(self.seed, ctx.global_step, images.device)
        chosen = choose_per_identity(labels, self.adv_fraction, generator)
        if not bool(chosen.any()):
            return images, labels, {"adv_fraction": 0.0}
        losses: list[torch.Tensor] = []

        def task_loss(candidate: torch.Tensor) -> torch.Tensor:
            loss = ctx.loss(model(candidate), labels)["total"]
            losses.append(loss.detach())
            return loss

        with frozen_batchnorm_stats(model):
            adversarial = self.attack.perturb(task_loss, images, mask=chosen, generator=generator)
        return (
            adversarial,
            labels,
            {
                "adv_fraction": chosen.float().mean(),
                # The task loss at the attack's start and at its last iterate (before the final step).
                "loss_first_iterate": losses[0],
                "loss_last_iterate": losses[-1],
            },
        )

    def extra_repr(self) -> str:
        a = self.attack
        return (
            f"name={self.name!r}, attack={self.attack_name}, eps={a.eps:.4g}, step_size={a.step_size:.4g}, "
            f"steps={a.steps}, random_start={a.random_start}, adv_fraction={self.adv_fraction}"
        )
