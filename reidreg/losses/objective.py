"""The task loss of one batch: per objective module, label-smoothed CE + batch-hard triplet (weights 1).

Label smoothing follows eq. (1) of AdaptiveReID (ICPR 2020), q'(i) = (1 − ε) q(i) + ε/N, which is exactly what
``F.cross_entropy(label_smoothing=ε)`` computes. Every term is returned separately (``<head>/ce``,
``<head>/triplet``) so it can be logged, and regularizers such as SGSL can read the CE values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidreg.losses.triplet import BatchHardTripletLoss
from reidreg.models.heads import HeadOutput


class ReIDLoss(nn.Module):
    """Sum over objective modules of ``ce_weight·CE_LS + triplet_weight·triplet`` (triplet switchable)."""

    def __init__(
        self,
        *,
        label_smoothing: float = 0.1,
        triplet: bool = True,
        triplet_margin: float | None = None,
        ce_weight: float = 1.0,
        triplet_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ce_weight, self.triplet_weight = ce_weight, triplet_weight
        self.triplet = BatchHardTripletLoss(triplet_margin) if triplet else None

    def forward(self, outputs: dict[str, HeadOutput], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms by name, unweighted; ``total`` is their weighted sum."""
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, out in outputs.items():
            ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=self.label_smoothing)
            terms[f"{name}/ce"] = ce
            total = total + self.ce_weight * ce
            if self.triplet is not None:
                triplet = self.triplet(out.embedding, labels)
                terms[f"{name}/triplet"] = triplet
                total = total + self.triplet_weight * triplet
        terms["total"] = total
        return terms
