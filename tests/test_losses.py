"""Task losses against direct evaluations of their definitions."""

import torch
import torch.nn.functional as F

from reidreg.losses import BatchHardTripletLoss, ReIDLoss
from reidreg.models.heads import HeadOutput


def test_label_smoothing_matches_paper_eq1():
    logits, labels, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    q = F.one_hot(labels, 5).float()
    smoothed = (1 - eps) * q + eps / 5  # AdaptiveReID eq. (1)
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    out = {"global": HeadOutput(embedding=torch.rand(6, 3), bn_feature=torch.rand(6, 3), logits=logits)}
    terms = ReIDLoss(label_smoothing=eps, triplet=False)(out, labels)
    torch.testing.assert_close(terms["global/ce"], expected)
    torch.testing.assert_close(terms["total"], expected)


def _reference_batch_hard(features, labels, margin):
    losses = []
    for a in range(len(labels)):
        dists = [(features[a] - features[j]).norm() for j in range(len(labels))]
        pos = max(d for j, d in enumerate(dists) if labels[j] == labels[a])
        neg = min(d for j, d in enumerate(dists) if labels[j] != labels[a])
        losses.append(F.softplus(pos - neg) if margin is None else F.relu(pos - neg + margin))
    return torch.stack(losses).mean()


def test_batch_hard_triplet_soft_and_hinge_match_reference():
    torch.manual_seed(0)
    features, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for margin in (None, 0.3):
        got = BatchHardTripletLoss(margin)(features, labels)
        torch.testing.assert_close(got, _reference_batch_hard(features, labels, margin), atol=1e-5, rtol=1e-5)


def test_triplet_gradient_is_finite_for_identical_embeddings():
    features = torch.ones(4, 3, requires_grad=True)
    BatchHardTripletLoss()(features, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(features.grad).all()
