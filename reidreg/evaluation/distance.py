"""Query-gallery distances and the end-to-end ReID evaluation from features.

``evaluate`` computes the distance matrix one chunk of queries at a time (on the features' device) and
ranks each chunk as it goes (:mod:`reidreg.evaluation.ranking`), so the full query x gallery matrix is never
held, except with ``rerank=True``: k-reciprocal re-ranking needs the full query-query, query-gallery and
gallery-gallery matrices (for MSMT17, 82k x 82k gallery distances = 27 GB: not practical there).

Metrics:
- ``"cosine"``: 1 - cosine similarity of the L2-normalised features, clamped to [0, 2].
- ``"euclidean"``: the *squared* Euclidean distance (clamped at 0); the ranking equals that of the plain
  distance, and re-ranking's original formulation uses the squared distance too.
"""

from typing import Literal

import numpy as np
import torch

from reidreg.evaluation.ranking import RankAccumulator, as_labels, rank_metrics
from reidreg.evaluation.rerank import re_ranking

METRICS = ("cosine", "euclidean")
MetricName = Literal["cosine", "euclidean"]

# Default query chunk: about this many distances (64 MB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# F.normalize's epsilon: an all-zero feature gets cosine similarity 0 to everything.
NORM_EPS = 1e-12


def as_features(values: np.ndarray | torch.Tensor, *, name: str) -> torch.Tensor:
    """2-D float features as a torch tensor (numpy -> CPU tensor; half precision widened to float32)."""
    features = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    if features.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_items, feature_dim), got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float32, torch.float64):
        features = features.to(torch.float32)
    return features.detach()


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


class GalleryDistance:
    """Distances from query features to a fixed gallery, with the gallery-side terms computed once."""

    def __init__(self, gallery: torch.Tensor, metric: MetricName) -> None:
        check_metric(metric)
        self.gallery, self.metric = gallery, metric
        # A norm reduction, not (g * g).sum(1), which would hold a gallery-sized temporary.
        norm = torch.linalg.vector_norm(gallery, dim=1)
        if metric == "cosine":
            # Scaling the product by 1/||g|| avoids a normalised copy of the (large) gallery.
            self.gallery_scale = 1.0 / norm.clamp_min(NORM_EPS)
        else:
            self.gallery_squared_norm = norm.square()

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """(num_queries, num_gallery) distances, on the features' device."""
        if queries.shape[1] != self.gallery.shape[1]:
            raise ValueError(
                f"query features have dimension {queries.shape[1]}, gallery features {self.gallery.shape[1]}"
            )
        queries = queries.to(self.gallery.dtype)
        if self.metric == "cosine":
            similarity = torch.nn.functional.normalize(queries, dim=1, eps=NORM_EPS) @ self.gallery.T
            # Rounding can push 1 - cos slightly below 0 for (near-)identical features.
            return similarity.mul_(-self.gallery_scale).add_(1.0).clamp_(0.0, 2.0)
        squared = torch.addmm(self.gallery_squared_norm[None, :], queries, self.gallery.T, alpha=-2.0)
        return squared.add_(torch.linalg.vector_norm(queries, dim=1, keepdim=True).square()).clamp_min_(0.0)


def pairwise_distance(
    x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, metric: MetricName = "cosine"
) -> torch.Tensor:
    """Full (len(x), len(y)) distance matrix, computed as ``evaluate`` computes its chunks."""
    x, y = as_features(x, name="x"), as_features(y, name="y")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y on {y.device}")
    return GalleryDistance(y, metric)(x)


def evaluate(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray | torch.Tensor,
    g_pids: np.ndarray | torch.Tensor,
    q_camids: np.ndarray | torch.Tensor,
    g_camids: np.ndarray | torch.Tensor,
    metric: MetricName = "cosine",
    max_rank: int = 50,
    rerank: bool = False,
    chunk_size: int | None = None,
    *,
    rerank_k1: int = 20,
    rerank_k2: int = 6,
    rerank_lambda: float = 0.3,
) -> dict:
    """ReID metrics (same dict as :func:`rank_metrics`) of query features against gallery features.

    Features are (num_items, dim) torch tensors (computed on their device) or numpy arrays (torch CPU).
    ``chunk_size`` is the number of queries whose distances are held at once (default: about 2**24
    distances). ``rerank=True`` applies k-reciprocal re-ranking (k1, k2, lambda) on full matrices.
    """
    check_metric(metric)
    q_feats, g_feats = as_features(q_feats, name="q_feats"), as_features(g_feats, name="g_feats")
    if q_feats.device != g_feats.device:
        raise ValueError(f"q_feats is on {q_feats.device} but g_feats on {g_feats.device}")
    num_query, num_gallery = len(q_feats), len(g_feats)
    q_pids = as_labels(q_pids, name="q_pids", length=num_query, side="query features")
    q_camids = as_labels(q_camids, name="q_camids", length=num_query, side="query features")
    g_pids = as_labels(g_pids, name="g_pids", length=num_gallery, side="gallery features")
    g_camids = as_labels(g_camids, name="g_camids", length=num_gallery, side="gallery features")
    distance_to_gallery = GalleryDistance(g_feats, metric)

    if rerank:
        reranked = re_ranking(
            distance_to_gallery(q_feats),
            pairwise_distance(q_feats, q_feats, metric),
            distance_to_gallery(g_feats),
            k1=rerank_k1,
            k2=rerank_k2,
            lambda_value=rerank_lambda,
        )
        return rank_metrics(reranked, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    queries_per_chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(num_gallery, 1))
    accumulator = RankAccumulator(g_pids=g_pids, g_camids=g_camids, max_rank=max_rank)
    for start in range(0, num_query, queries_per_chunk):
        chunk = slice(start, start + queries_per_chunk)
        dist = distance_to_gallery(q_feats[chunk])
        accumulator.add_rows(len(dist), lambda rows, dist=dist: dist[rows], q_pids[chunk], q_camids[chunk])
    return accumulator.result()
