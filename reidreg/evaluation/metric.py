"""ReID evaluation as a torchmetrics ``Metric``, for Lightning validation/test loops.

Each ``update`` adds a batch of embeddings with their pids, camera ids, an ``is_query`` flag and, optionally,
each sample's position in the canonical order of the evaluation set (query and gallery images may come in
any order and mix). States are lists concatenated across DDP ranks (``dist_reduce_fx="cat"``), and
``compute`` sorts them back into the canonical order (when positions were given) and runs
:func:`reidreg.evaluation.evaluate` on everything: the loading order and the DDP sharding never change a
result, not even how ties are ranked.

``compute`` also returns every query's result (``"per_query"``, a
:class:`~reidreg.per_query.PerQuery`) and keeps its whole result as ``last_result``, which
``reset`` leaves alone, so that a test loop's per-query results can be saved after it ends.

DDP: every sample must be seen by exactly one rank. A ``DistributedSampler`` pads the dataset with
repeated samples to equalise ranks; those duplicates would be counted twice (a duplicated gallery item is
an extra match). Shard the evaluation set without padding (our validation loader uses no
DistributedSampler) or evaluate on a single process.
"""

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from reidreg.evaluation.distance import MetricName, check_metric, evaluate

# CMC ranks also reported as scalars by ``compute`` (when max_rank allows).
REPORTED_RANKS = (1, 5, 10)


class ReIDMetric(Metric):
    """Accumulates query/gallery embeddings; ``compute`` returns evaluate()'s dict plus "R1", "R5", "R10".

    ``last_result``: the latest ``compute()`` result (None before the first), kept across ``reset()``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        metric: MetricName = "cosine",
        max_rank: int = 50,
        rerank: bool = False,
        *,
        chunk_size: int | None = None,
        rerank_k1: int = 20,
        rerank_k2: int = 6,
        rerank_lambda: float = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_metric(metric)
        self.metric, self.max_rank, self.rerank, self.chunk_size = metric, max_rank, rerank, chunk_size
        self.rerank_params = {"rerank_k1": rerank_k1, "rerank_k2": rerank_k2, "rerank_lambda": rerank_lambda}
        for name in ("feats", "pids", "camids", "is_query", "positions"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.last_result: dict | None = None

    def update(
        self,
        feats: torch.Tensor,
        pids: torch.Tensor,
        camids: torch.Tensor,
        is_query: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: feats (B, D); pids, camids (B,) integers; is_query (B,) bool (False = gallery);
        positions (B,) the samples' places in the canonical order (give them always or never)."""
        if feats.dim() != 2:
            raise ValueError(f"feats must be (batch, dim), got shape {tuple(feats.shape)}")
        labels = [("pids", pids), ("camids", camids), ("is_query", is_query)]
        for name, values in labels + ([("positions", positions)] if positions is not None else []):
            if values.shape != (feats.shape[0],):
                raise ValueError(f"{name} must have shape ({feats.shape[0]},), got {tuple(values.shape)}")
        self.feats.append(feats.detach())
        self.pids.append(pids.long())
        self.camids.append(camids.long())
        self.is_query.append(is_query.bool())
        if positions is not None:
            self.positions.append(positions.long())

    def forward(self, *args: torch.Tensor) -> None:
        """Same as ``update``: a per-batch value means nothing for retrieval (a batch's queries need the
        whole gallery), so unlike other metrics ``forward`` returns None."""
        self.update(*args)

    def compute(self) -> dict:
        # After a DDP sync the list states are already concatenated into one tensor.
        if isinstance(self.feats, list) and not self.feats:
            raise ValueError("ReIDMetric.compute() called before any update()")
        feats, pids, camids = dim_zero_cat(self.feats), dim_zero_cat(self.pids), dim_zero_cat(self.camids)
        is_query = dim_zero_cat(self.is_query)
        if not (isinstance(self.positions, list) and not self.positions):
            order = dim_zero_cat(self.positions).argsort()
            feats, pids, camids, is_query = feats[order], pids[order], camids[order], is_query[order]
        query, gallery = is_query, ~is_query
        result = evaluate(
            feats[query],
            feats[gallery],
            pids[query],
            pids[gallery],
            camids[query],
            camids[gallery],
            metric=self.metric,
            max_rank=self.max_rank,
            rerank=self.rerank,
            chunk_size=self.chunk_size,
            **self.rerank_params,
        )
        cmc: np.ndarray = result["cmc"]
        result.update({f"R{rank}": float(cmc[rank - 1]) for rank in REPORTED_RANKS if rank <= len(cmc)})
        self.last_result = result
        return result
