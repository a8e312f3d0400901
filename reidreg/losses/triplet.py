"""Batch-hard triplet loss (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017).

For each anchor a in the batch: d_ap = max over positives, d_an = min over negatives (Euclidean
distance of the embeddings). Soft margin: softplus(d_ap − d_an) (the AdaptiveReID official code);
hinge: max(0, m + d_ap − d_an) with a margin m (0.3 is usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_euclidean(features: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances; clamped before sqrt so the gradient at 0 stays finite."""
    squared = features.pow(2).sum(dim=1, keepdim=True)
    dist2 = squared + squared.t() - 2.0 * features @ features.t()
    return dist2.clamp_min(1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss; ``margin=None`` selects the soft margin."""

    def __init__(self, margin: float | None = None) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pairwise_euclidean(embeddings.float())
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        # Hardest positive: farthest same-id sample; hardest negative: closest other-id sample.
        d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        d_an = dist.masked_fill(same, float("inf")).min(dim=1).values
        if self.margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()
