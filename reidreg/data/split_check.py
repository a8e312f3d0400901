"""Check, before training, that a query/gallery split can be evaluated at all.

A query counts in the metrics only if the gallery holds an image of its identity taken by *another*
camera: gallery images of the same identity and camera are excluded from its ranking (the Market-1501
protocol of "Scalable Person Re-identification: A Benchmark", Zheng et al., ICCV 2015, as
``reidreg.evaluation.ranking`` implements it). A split where no query has such a match (or an empty
query or gallery set) has no mAP: without this check it is found after training, as a traceback. Queries
without a match in an otherwise good split are left out of every average; they are counted in one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pytorch_lightning.utilities.rank_zero import rank_zero_only

from reidreg.data.datasets import Sample
from reidreg.errors import ReIDRegError

log = logging.getLogger(__name__)

NUM_LISTED = 3  # queries without a match named in the warning

MATCH_RULE = "an image of the same identity from another camera; same-camera images do not count"


def queries_without_match(query: Sequence[Sample], gallery: Sequence[Sample]) -> list[int]:
    """Indices of the queries whose identity has no gallery image from another camera."""
    cameras: dict[int, set[int]] = {}
    for _, pid, camid in gallery:
        cameras.setdefault(pid, set()).add(camid)
    return [index for index, (_, pid, camid) in enumerate(query) if not cameras.get(pid, set()) - {camid}]


def check_split(
    query: Sequence[Sample], gallery: Sequence[Sample], *, name: str, error: type[ReIDRegError], fix: str
) -> None:
    """Raise ``error`` (one line: ``name``, what is wrong, ``fix``) if the split cannot be evaluated: an
    empty query or gallery set, or no query with a match; log one warning if only some have none."""
    for role, samples in (("query", query), ("gallery", gallery)):
        if not samples:
            raise error(f"{name}: the {role} set is empty; {fix}")
    unmatched = queries_without_match(query, gallery)
    if len(unmatched) == len(query):
        raise error(
            f"{name}: none of the {len(query):,} queries has a match in the gallery of "
            f"{len(gallery):,} images ({MATCH_RULE}), so no metric can be computed; {fix}"
        )
    if unmatched and rank_zero_only.rank == 0:
        listed = ", ".join(
            f"{query[index][0]} (pid {query[index][1]}, c{query[index][2] + 1})"
            for index in unmatched[:NUM_LISTED]
        )
        more = ", ..." if len(unmatched) > NUM_LISTED else ""
        log.warning(
            "%s: %s of the %s queries have no match in the gallery (%s) and are left out of every "
            "metric: %s%s",
            name,
            f"{len(unmatched):,}",
            f"{len(query):,}",
            MATCH_RULE,
            listed,
            more,
        )
