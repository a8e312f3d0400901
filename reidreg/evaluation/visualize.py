"""Ranked-list images: a query and its top-k gallery images, as Fig. 5 of the AdaptiveReID paper.

The query has an orange border; gallery images a green border when they show the query's identity and
red otherwise. As in the evaluation protocol, gallery images of the query's identity taken by the
query's camera are left out of the ranking.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps

from reidreg.data.datasets import Sample
from reidreg.evaluation.distance import pairwise_distance

QUERY_COLOUR, MATCH_COLOUR, WRONG_COLOUR = (255, 140, 0), (0, 170, 0), (220, 0, 0)


def _tile(path: str, colour: tuple[int, int, int], size: tuple[int, int], border: int = 4) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size[0] - 2 * border, size[1] - 2 * border))
    return ImageOps.expand(image, border=border, fill=colour)


def save_ranked_lists(
    features: dict[str, torch.Tensor],
    query: Sequence[Sample],
    gallery: Sequence[Sample],
    path: str | Path,
    *,
    num_queries: int = 8,
    top_k: int = 10,
    metric: str = "cosine",
    seed: int = 0,
    tile_size: tuple[int, int] = (64, 128),
) -> Path:
    """One row per randomly chosen query (query first, then its top-k); returns the PNG's path.

    ``features`` holds ``feats`` and ``is_query`` in the order query then gallery, matching the lists.
    """
    is_query = features["is_query"]
    q_feats, g_feats = features["feats"][is_query], features["feats"][~is_query]
    chosen = sorted(random.Random(seed).sample(range(len(query)), min(num_queries, len(query))))
    distances = pairwise_distance(q_feats[chosen], g_feats, metric=metric).cpu()
    width, height = tile_size
    canvas = Image.new("RGB", ((top_k + 1) * width + 8, len(chosen) * height), "white")
    for row, (q_index, q_distances) in enumerate(zip(chosen, distances, strict=True)):
        _, q_pid, q_cam = query[q_index]
        canvas.paste(_tile(query[q_index][0], QUERY_COLOUR, tile_size), (0, row * height))
        ranked = [
            g
            for g in q_distances.argsort().tolist()
            if not (gallery[g][1] == q_pid and gallery[g][2] == q_cam)
        ][:top_k]
        for column, g in enumerate(ranked, start=1):
            colour = MATCH_COLOUR if gallery[g][1] == q_pid else WRONG_COLOUR
            canvas.paste(_tile(gallery[g][0], colour, tile_size), (column * width + 8, row * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
