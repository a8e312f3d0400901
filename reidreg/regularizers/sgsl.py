"""SGSL — Stop-Gradient Softmax Loss (paper 004, eqs. 6–7; METHODS §4; official code).

A second, *cosine* softmax loss on each objective module that shares the identity classifier with the
label-smoothed CE but lets no gradient reach that classifier. With x = the module's BN output and W its
classifier rows, both L2-normalised, and W detached (Ŵ):

    s_p = cos(x, Ŵ_y)                                       (positive-proxy similarity)
    s_n = LSE^γ_{j≠y} cos(x, Ŵ_j) = (1/γ) log Σ_{j≠y} exp(γ cos(x, Ŵ_j))   (soft max over the negatives)
    L_SGSL = (1/N) Σ_i softplus(s_n − s_p)                 (eq. 6)
    L = L_task + β · L_SGSL                                 (eq. 7; β as in the paper's Table 6)

The CE (via the shared classifier) keeps placing the class proxies W; SGSL only pulls each L2-normalised
feature towards its own proxy and away from the nearest other one — the metric used at test time.
Eq. 8's hinge max_{j≠y} cos − cos_y is the γ → ∞ limit; γ = 30 (paper default) is nearly that.

Paper vs official code vs this file:

- Eq. 7 has no β; the text (Table 6, "equation 10") weights SGSL by β, default 1.0. Official code: the
  SGSL value is added to the CE before CE's own scale (1.0), i.e. β = 1. We expose β.
- *Gate.* The paper says SGSL "starts to join the training only when the value of softmax is smaller
  than 3". The official code checks the label-smoothed CE of **every batch**: CE > 3 → CE alone,
  otherwise CE + SGSL (the gate can close again). We do the same, per objective module, with that
  module's ``<head>/ce``; ``ce_gate=None`` adds SGSL in every batch. Our CE smooths as q' = (1−ε)q + ε/N
  (paper 000 eq. 1) where the official code uses ε/(N−1) off-target — a negligible shift of the gate.
  Under DDP each rank gates on the CE of its own share of the batch (the official code ran on one GPU).
- The official code writes softplus as log(1 + exp(·)) and takes logsumexp over the negatives gathered
  with a boolean mask; here the target is masked with −inf inside one logsumexp, and ``F.softplus`` is
  used — the same values, without overflow.
- The official model has one head (BNNeck); here every objective module (global + stripes) gets its own
  SGSL term, on its own BN output and classifier, unless ``heads`` restricts them.

Computed in (at least) float32 with autocast off: at γ = 30 an fp16 cosine (error ~1e-3) would move the
exponents by ~0.03. RBR, the paper's other trick, is a backbone option (``backbone.rbr``, see
``models/backbone.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from reidreg.errors import ConfigError
from reidreg.regularizers.base import LogDict, Regularizer, TrainStep

if TYPE_CHECKING:
    from reidreg.training.module import ReIDModule


def stop_gradient_softmax_loss(
    features: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """L_SGSL of paper 004 eq. 6 (batch mean) for features (B, D), classifier rows (C, D), labels (B,).

    The classifier rows are detached here, so the loss has a gradient w.r.t. ``features`` only.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)  # fp16/bf16 → fp32; fp64 stays
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.to(dtype), dim=1)
        proxies = F.normalize(class_weights.detach().to(dtype), dim=1)
        cosines = x @ proxies.t()  # (B, C)
        is_target = F.one_hot(labels, num_classes=cosines.shape[1]).bool()
        positive = cosines[is_target]  # s_p, (B,)
        # s_n = LSE^γ over j ≠ y: exp(−inf) = 0 drops the target class from the sum.
        negative = torch.logsumexp(gamma * cosines.masked_fill(is_target, float("-inf")), dim=1) / gamma
        return F.softplus(negative - positive).mean()


class SGSL(Regularizer):
    """Adds ``beta · L_SGSL`` (eq. 6) per objective module, gated on that module's CE (official code).

    Args:
        gamma: γ of LSE^γ, the sharpness of the soft maximum over negative proxies (paper: 30).
        beta: weight of each module's L_SGSL in the total loss (paper Table 6: 1.0).
        ce_gate: add a module's SGSL only in batches whose label-smoothed CE of that module is ≤ this
            (official code: 3.0); ``None`` = always add.
        heads: objective modules to regularize (e.g. ``["global"]``); ``None`` = all of them.

    Loss terms (logged as ``reg/<name>/...``): ``<head>/sgsl`` = what is added, β·L_SGSL or 0 while the
    gate is closed. Also logged every step: ``<head>/l_sgsl`` = eq. 6's value (unweighted, computed
    even while the gate is closed, without a graph) and ``<head>/gate_open`` (1/0).
    """

    def __init__(
        self,
        *,
        gamma: float = 30.0,
        beta: float = 1.0,
        ce_gate: float | None = 3.0,
        heads: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ConfigError(f"regularizer.sgsl.gamma must be > 0, got {gamma}")
        self.gamma, self.beta, self.ce_gate = float(gamma), float(beta), ce_gate
        self.heads = tuple(heads) if heads is not None else None
        # Diagnostics of the current step: loss_terms' values are all added to the loss, so values that
        # must only be logged wait for the next hook that returns logs (on_before_optimizer_step).
        self._pending_logs: LogDict = {}

    def attach(self, module: ReIDModule) -> None:
        available = module.model.head_names
        unknown = sorted(set(self.heads or ()) - set(available))
        if unknown:
            raise ConfigError(
                f"regularizer.{self.name}.heads: unknown objective modules {unknown}; available: {available}"
            )

    def gate_open(self, step: TrainStep, head: str) -> bool:
        """Official code: SGSL joins this batch's loss unless the head's smoothed CE exceeds the gate."""
        return self.ce_gate is None or step.task_losses[f"{head}/ce"].item() <= self.ce_gate

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for head in self.heads or tuple(step.outputs):
            is_open = self.gate_open(step, head)
            # A closed gate builds no graph at all: the logged value can carry no gradient.
            with torch.set_grad_enabled(is_open and torch.is_grad_enabled()):
                value = stop_gradient_softmax_loss(
                    step.outputs[head].bn_feature,
                    step.model.objective_modules[head].classifier.weight,
                    step.labels,
                    gamma=self.gamma,
                )
            terms[f"{head}/sgsl"] = self.beta * value if is_open else value.new_zeros(())
            self._pending_logs[f"{head}/l_sgsl"] = value.detach()
            self._pending_logs[f"{head}/gate_open"] = float(is_open)
        return terms

    def on_before_optimizer_step(self, module: ReIDModule, optimizer: torch.optim.Optimizer) -> LogDict:
        logs, self._pending_logs = self._pending_logs, {}
        return logs

    def extra_repr(self) -> str:
        options = f"gamma={self.gamma}, beta={self.beta}, ce_gate={self.ce_gate}, heads={self.heads}"
        return f"{super().extra_repr()}, {options}"
