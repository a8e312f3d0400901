"""SGSL — Stop-Gradient Softmax Loss, a loss term (Yang, Wang, Zhang, "Stop-Gradient Softmax Loss for Deep
Metric Learning", AAAI 2023, eqs. 6–7, and its official code).

Per objective module, with x its L2-normalised BN output (``feature: embedding``: its retrieval embedding)
and Ŵ its classifier rows, L2-normalised and detached (the CE alone trains the classifier)::

    s_p = cos(x, Ŵ_y),   s_n = (1/γ) log Σ_{j≠y} exp(γ cos(x, Ŵ_j)),   L_SGSL = mean softplus(s_n − s_p)
    L = L_task + β · L_SGSL per module (``heads`` restricts the modules)

Gate (official code): a module's term joins a batch only while its label-smoothed CE ≤ ``ce_gate``. The
gate is a device tensor (``where``, no host sync); a closed gate adds exactly 0 and passes no gradient.
Computed in at least float32 with autocast off. Logged per head: ``sgsl`` (added), ``l_sgsl`` (eq. 6,
also while closed), ``gate_open``. Paper vs official code and the choices: docs/methods/sgsl.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from reidreg.errors import ConfigError
from reidreg.options.rules import choice, list_of, number, optional, string
from reidreg.regularizers.base import Regularizer, TrainStep

FEATURES = ("bn", "embedding")


def stop_gradient_softmax_loss(
    features: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """L_SGSL of eq. 6 (batch mean) for features (B, D), classifier rows (C, D), labels (B,).

    The classifier rows are detached here, so the loss has a gradient w.r.t. ``features`` only.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)  # fp16/bf16 → fp32; fp64 stays
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.to(dtype), dim=1)
        proxies = F.normalize(class_weights.detach().to(dtype), dim=1)
        cosines = x @ proxies.t()  # (B, C)
        # gather and a comparison, not a boolean mask: no data-dependent shape (a device sync on CUDA).
        positive = cosines.gather(1, labels[:, None]).squeeze(1)  # s_p, (B,)
        is_target = labels[:, None] == torch.arange(cosines.shape[1], device=labels.device)
        # s_n = LSE^γ over j ≠ y: exp(−inf) = 0 drops the target class from the sum.
        negative = torch.logsumexp(gamma * cosines.masked_fill(is_target, float("-inf")), dim=1) / gamma
        return F.softplus(negative - positive).mean()


class SGSL(Regularizer):
    """Adds ``beta · L_SGSL`` (eq. 6) per objective module, gated on that module's CE (official code).

    Args:
        gamma: γ of LSE^γ, the sharpness of the soft maximum over negative proxies (paper: 30).
        beta: weight of *each* module's L_SGSL in the total loss (paper Table 6: 1.0, for its one head;
            with the three modules of AdaptiveReID that is three terms of weight β, see ``heads``).
        ce_gate: add a module's SGSL only in batches whose label-smoothed CE of that module is ≤ this
            (official code: 3.0); ``None`` = always add.
        heads: objective modules to regularize (e.g. ``["global"]``, the paper's single term); ``None`` =
            all of them (global + stripes).
        feature: ``bn`` — the module's BN output, the paper's BNNeck placement; ``embedding`` — the
            clipped pre-BN embedding that retrieval uses (see the module docstring).

    Loss terms (logged as ``reg/<name>/...``): ``<head>/sgsl`` = what is added, β·L_SGSL or 0 while the
    gate is closed. Also logged every step: ``<head>/l_sgsl`` = eq. 6's value (unweighted, computed
    even while the gate is closed, with no gradient reaching the feature) and ``<head>/gate_open`` (1/0).
    """

    OPTION_RULES = {
        "gamma": number(gt=0),
        "beta": number(),
        "ce_gate": optional(number()),
        "heads": optional(list_of(string())),
        "feature": choice(*FEATURES),
    }

    def __init__(
        self,
        *,
        gamma: float = 30.0,
        beta: float = 1.0,
        ce_gate: float | None = 3.0,
        heads: Sequence[str] | None = None,
        feature: str = "bn",
    ) -> None:
        super().__init__()
        self.gamma, self.beta, self.ce_gate, self.feature = float(gamma), float(beta), ce_gate, feature
        self.heads = tuple(heads) if heads is not None else None

    def attach(self, module: Any) -> None:
        available = module.model.head_names
        unknown = sorted(set(self.heads or ()) - set(available))
        if unknown:
            raise ConfigError(
                f"regularizer.{self.name}.heads: unknown objective modules {unknown}; available: {available}"
            )

    def gate_open(self, step: TrainStep, head: str) -> torch.Tensor | None:
        """Official code: SGSL joins this batch's loss unless the head's smoothed CE exceeds the gate.

        A 0-dim bool tensor on the CE's device (read by no one on the host); ``None`` = no gate.
        """
        return None if self.ce_gate is None else step.task_losses[f"{head}/ce"].detach() <= self.ce_gate

    @staticmethod
    def closed_on_host(is_open: torch.Tensor | None) -> bool:
        """The gate is known to be closed without a device synchronisation: its CE lives on the CPU."""
        return is_open is not None and is_open.device.type == "cpu" and not is_open.item()

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for head in self.heads or tuple(step.outputs):
            is_open = self.gate_open(step, head)
            output = step.outputs[head]
            features = output.bn_feature if self.feature == "bn" else output.embedding
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.closed_on_host(is_open)):
                if is_open is not None:  # a closed gate passes no gradient at all (not 0·NaN)
                    features = torch.where(is_open, features, features.detach())
                value = stop_gradient_softmax_loss(
                    features,
                    step.model.objective_modules[head].classifier.weight,
                    step.labels,
                    gamma=self.gamma,
                )
            term = self.beta * value
            terms[f"{head}/sgsl"] = term if is_open is None else torch.where(is_open, term, 0.0)
            gate = 1.0 if is_open is None else is_open.float()
            step.context.log(self, {f"{head}/l_sgsl": value, f"{head}/gate_open": gate})  # logged, not added
        return terms

    def extra_repr(self) -> str:
        options = (
            f"gamma={self.gamma}, beta={self.beta}, ce_gate={self.ce_gate}, heads={self.heads}, "
            f"feature={self.feature}"
        )
        return f"{super().extra_repr()}, {options}"
