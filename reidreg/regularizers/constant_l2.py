"""Constant L2 regularization: one hand-picked λ for every tensor, λ Σₙ ‖wₙ‖² (Ni et al., "AdaptiveReID:
Adaptive L2 Regularization in Person Re-Identification", ICPR 2020, eq. 3).

``mode="coupled"`` (the paper's official code): the penalty's gradient 2λwₙ is added to every trainable
wₙ's ``.grad`` right before the optimizer step (a gradient transform, two foreach operators), so Adam
rescales it like any other gradient; with ``differentiable=true`` the penalty is a loss term through
autograd instead (for methods that need the full differentiable objective; one backward node per tensor).
``mode="decoupled"``: AdamW-style decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", ICLR 2019): ``w ← w − lr·λ·w`` before each step, for the tensors of the optimizer's
groups that have a gradient, so Adam(weight_decay=0) + this == AdamW step for step (λ is then a decay
rate; under AMP a skipped step is still decayed). The optimizer's own weight decay must be 0. The penalty
value λ Σₙ ‖wₙ‖² is logged every step as ``reg/<name>/penalty``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from reidreg.errors import ConfigError
from reidreg.options.rules import boolean, choice, list_of, number, optional
from reidreg.regularizers.base import LogDict, Regularizer, StepContext, TrainStep
from reidreg.regularizers.foreach import ParameterLookup, add_scaled_to_grads
from reidreg.regularizers.l2_targets import L2_CATEGORIES, l2_targets, squared_norms


class ConstantL2(Regularizer):
    """λ Σₙ ‖wₙ‖² over the tensors of ``categories`` (default: all), coupled (in the loss) or decoupled."""

    OPTION_RULES = {
        "lam": number(ge=0),
        "mode": choice("coupled", "decoupled"),
        "categories": optional(list_of(choice(*L2_CATEGORIES))),
        "differentiable": boolean(),
    }
    replaces_weight_decay = True

    def __init__(
        self,
        *,
        lam: float = 0.005,
        categories: Sequence[str] | None = None,
        mode: Literal["coupled", "decoupled"] = "coupled",
        differentiable: bool = False,
    ) -> None:
        super().__init__()
        if differentiable and mode == "decoupled":
            raise ConfigError("regularizer.constant_l2.differentiable=true needs mode=coupled")
        self.lam, self.mode, self.differentiable = float(lam), mode, differentiable
        self.categories = None if categories is None else list(categories)
        self.target_names: list[str] = []
        self._lookup = ParameterLookup([])

    def attach(self, module: Any) -> None:
        self.target_names = [target.name for target in l2_targets(module.model, self.categories)]
        self._lookup = ParameterLookup(self.target_names)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """λ Σₙ ‖wₙ‖² (eq. 3), differentiable by autograd."""
        return self.lam * sum(p.square().sum() for p in self._lookup(model))

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        return {"penalty": self.penalty(step.model)} if self.differentiable else {}

    @torch.no_grad()
    def transform_gradients(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> LogDict:
        if self.differentiable:
            return {}
        parameters = self._lookup(ctx.model)
        logs: LogDict = {"penalty": self.lam * squared_norms(parameters).sum()}
        if self.mode == "coupled":
            trainable = [p for p in parameters if p.requires_grad]
            add_scaled_to_grads(trainable, 2 * self.lam)
            return logs
        covered = {id(p) for p in parameters}
        for group in optimizer.param_groups:
            # AdamW decays only the tensors it updates: those with a gradient (frozen ones are kept).
            decayed = [p for p in group["params"] if p.grad is not None and id(p) in covered]
            if decayed:
                torch._foreach_mul_(decayed, 1 - group["lr"] * self.lam)
        return logs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, mode={self.mode!r}, tensors={len(self.target_names)}"
