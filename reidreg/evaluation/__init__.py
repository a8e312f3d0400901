"""ReID evaluation: exact CMC / mAP / mINP (fast, chunked), k-reciprocal re-ranking, torchmetrics wrapper.

- :func:`rank_metrics` — metrics of a query x gallery distance matrix (the protocol is documented in
  :mod:`reidreg.evaluation.ranking`).
- :func:`evaluate` — metrics from query/gallery features, distances computed chunk by chunk.
- :func:`pairwise_distance` — the distance matrix ``evaluate`` uses ("cosine" or squared "euclidean").
- :func:`re_ranking` — k-reciprocal re-ranking (Zhong et al., CVPR 2017).
- :class:`ReIDMetric` — torchmetrics Metric accumulating embeddings across batches and DDP ranks.
"""

from typing import Any

from reidreg.evaluation.distance import METRICS, evaluate, pairwise_distance
from reidreg.evaluation.ranking import rank_metrics
from reidreg.evaluation.rerank import re_ranking

__all__ = ["METRICS", "ReIDMetric", "evaluate", "pairwise_distance", "rank_metrics", "re_ranking"]


def __getattr__(name: str) -> Any:
    # Imported on first use: torchmetrics pulls in torchvision, seconds of import time that scripts
    # which only rank distances should not pay.
    if name == "ReIDMetric":
        from reidreg.evaluation.metric import ReIDMetric

        return ReIDMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
