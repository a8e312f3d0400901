"""Constant L2 regularization (paper 000 eq. 3; Table III, last row): one hand-picked λ for every tensor.

``mode="coupled"`` (official code): the penalty λ Σₙ ‖wₙ‖² is *added to the loss*, so under Adam its
gradient 2λw is rescaled per coordinate like any other gradient. The optimizer's own weight decay must
be 0 (``replaces_weight_decay``), so nothing is counted twice.

``mode="decoupled"`` (our option, for comparison): AdamW-style decoupled weight decay (Loshchilov &
Hutter). No loss term; before each optimizer step every covered tensor of the optimizer's param groups
that has a gradient is shrunk as ``w ← w − lr·λ·w`` with its group's current lr, exactly as
``torch.optim.AdamW(weight_decay=λ)`` does, so Adam(weight_decay=0) + this mode == AdamW step for step.
Note that λ means different things in the two modes (λ = 0.005 is the coupled value of the paper), and
that under AMP a step skipped for inf/NaN gradients is still decayed (AdamW would skip it).

The penalty value λ Σₙ ‖wₙ‖² is logged in both modes (``reg/<name>/penalty``).

Gradient path (coupled), a few operators for any number of tensors (issue 10): the penalty is an autograd
``Function`` of the weights whose backward returns no gradient to autograd (so no per-tensor
``AccumulateGrad`` addition) and instead, at the end of the backward pass (``foreach.after_backward``), adds
g·2λwₙ to every trainable wₙ's ``.grad`` in two foreach operators, g being the gradient that reached the
penalty (1, or the GradScaler's scale under 16-bit AMP, read as a device tensor). This is exactly what
autograd would accumulate: the same terms, in fp32, before AMP unscaling (which then divides them by the
scale like every other gradient, and checks them for inf/NaN), and with DDP after the all-reduce: each rank
adds the same g·2λwₙ to the averaged task gradient, which is the average of the per-rank sums autograd
would give. Frozen tensors (``requires_grad=False``) get no gradient, as under autograd. Use
``.backward()`` on the loss: ``torch.autograd.grad`` would not see the penalty's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from reidreg.errors import ConfigError
from reidreg.regularizers.base import LogDict, Regularizer, TrainStep
from reidreg.regularizers.foreach import ParameterLookup, add_to_grads, after_backward
from reidreg.regularizers.l2_targets import l2_targets, squared_norms

if TYPE_CHECKING:
    from reidreg.training.module import ReIDModule


class ConstantL2(Regularizer):
    """λ Σₙ ‖wₙ‖² over the tensors of ``categories`` (default: all), coupled (in the loss) or decoupled."""

    replaces_weight_decay = True

    def __init__(
        self,
        *,
        lam: float = 0.005,
        categories: Sequence[str] | None = None,
        mode: Literal["coupled", "decoupled"] = "coupled",
    ) -> None:
        super().__init__()
        if mode not in ("coupled", "decoupled"):
            raise ConfigError(f"regularizer.constant_l2.mode must be 'coupled' or 'decoupled', got {mode!r}")
        if lam < 0:
            raise ConfigError(f"regularizer.constant_l2.lam must be >= 0, got {lam}")
        self.lam, self.mode = float(lam), mode
        self.categories = None if categories is None else list(categories)
        self.target_names: list[str] = []
        self.target_categories: list[str] = []
        self._lookup = ParameterLookup([])

    def attach(self, module: ReIDModule) -> None:
        targets = l2_targets(module.model, self.categories)
        self.target_names = [target.name for target in targets]
        self.target_categories = [target.category for target in targets]
        self._lookup = ParameterLookup(self.target_names)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """λ Σₙ ‖wₙ‖² (eq. 3); ``.backward()`` adds 2λwₙ to the gradient of every trainable wₙ."""
        return _ConstantL2Penalty.apply(self.lam, *self._lookup(model))

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        return {"penalty": self.penalty(step.model)} if self.mode == "coupled" else {}

    def on_before_optimizer_step(self, module: ReIDModule, optimizer: torch.optim.Optimizer) -> LogDict:
        if self.mode == "coupled":
            return {}
        with torch.no_grad():
            parameters = self._lookup(module.model)
            logs: LogDict = {"penalty": self.lam * squared_norms(parameters).sum()}
            covered = {id(p) for p in parameters}
            for group in optimizer.param_groups:
                # AdamW decays only the tensors it updates: those with a gradient (frozen ones are kept).
                decayed = [p for p in group["params"] if p.grad is not None and id(p) in covered]
                if decayed:
                    torch._foreach_mul_(decayed, 1 - group["lr"] * self.lam)
        return logs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, mode={self.mode!r}, tensors={len(self.target_names)}"


class _ConstantL2Penalty(torch.autograd.Function):
    """λ Σₙ ‖wₙ‖² of its inputs (the wₙ); backward adds g·2λwₙ to ``wₙ.grad`` at the end of the pass."""

    @staticmethod
    def forward(ctx, lam: float, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.lam = lam
        ctx.save_for_backward(*parameters)
        return lam * squared_norms(parameters).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, ...]:
        needs_grad = ctx.needs_input_grad[1:]
        trainable = [p for p, needed in zip(ctx.saved_tensors, needs_grad, strict=True) if needed]
        if trainable:
            coefficient = grad * (2 * ctx.lam)  # a device tensor: no host sync, whatever the AMP scale
            after_backward(lambda: add_to_grads(trainable, torch._foreach_mul(trainable, coefficient)))
        return (None,) * len(ctx.needs_input_grad)
