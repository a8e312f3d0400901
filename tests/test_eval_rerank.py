"""k-reciprocal re-ranking against a direct loop implementation of the algorithm, plus key properties."""

import numpy as np
import pytest
import torch

from reidreg.evaluation import pairwise_distance, rank_metrics, re_ranking


def reference_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value):
    """Dense, loop-per-item transcription of the steps in reidreg.evaluation.rerank's docstring."""
    num_query = q_g.shape[0]
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    dist /= dist.max(1, keepdims=True)
    num_items = len(dist)
    ranked = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        return {j for j in ranked[i, : k + 1] if i in ranked[j, : k + 1]}

    encoding = np.zeros_like(dist)
    for i in range(num_items):
        expanded = reciprocal(i, k1)
        for candidate in reciprocal(i, k1):
            candidate_set = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(candidate_set & reciprocal(i, k1)) > 2 / 3 * len(candidate_set):
                expanded |= candidate_set
        members = sorted(expanded)
        weights = np.exp(-dist[i, members])
        encoding[i, members] = weights / weights.sum()
    if k2 > 1:
        encoding = np.stack([encoding[ranked[i, :k2]].mean(0) for i in range(num_items)])
    jaccard = np.empty((num_query, num_items - num_query))
    for i in range(num_query):
        for j in range(num_query, num_items):
            jaccard[i, j - num_query] = 1 - (
                np.minimum(encoding[i], encoding[j]).sum() / np.maximum(encoding[i], encoding[j]).sum()
            )
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_query, num_query:]


def distances(feats_query, feats_gallery):
    return (
        pairwise_distance(feats_query, feats_gallery, "euclidean").sqrt().numpy(),
        pairwise_distance(feats_query, feats_query, "euclidean").sqrt().numpy(),
        pairwise_distance(feats_gallery, feats_gallery, "euclidean").sqrt().numpy(),
    )


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (4, 3, 0.0), (7, 1, 0.5), (3, 2, 0.3)])
def test_matches_loop_reference(k1, k2, lambda_value):
    rng = np.random.default_rng(k1)
    q_g, q_q, g_g = distances(rng.standard_normal((9, 4)), rng.standard_normal((31, 4)))
    result = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    expected = reference_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
    assert result.shape == (9, 31) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_lambda_one_is_normalised_squared_original_distance():
    rng = np.random.default_rng(0)
    q_g, q_q, g_g = distances(rng.standard_normal((5, 3)), rng.standard_normal((12, 3)))
    result = re_ranking(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), lambda_value=1.0)
    row_max = np.maximum(q_q.max(1), q_g.max(1))[:, None] ** 2
    np.testing.assert_allclose(result, q_g**2 / row_max, rtol=1e-6)
    np.testing.assert_array_equal(np.argsort(result, 1, kind="stable"), np.argsort(q_g, 1, kind="stable"))


def test_improves_map_on_clustered_problem():
    """Each identity is a tight cluster plus a few outlying views, which neighbourhoods bring back."""
    rng = np.random.default_rng(1)
    num_ids, per_id = 20, 8
    centres = rng.standard_normal((num_ids, 16)) * 3
    pids = np.repeat(np.arange(1, num_ids + 1), per_id)
    feats = (
        centres[pids - 1]
        + rng.standard_normal((len(pids), 16)) * np.where(rng.random(len(pids)) < 0.3, 3, 1)[:, None]
    )
    is_query = np.tile(np.arange(per_id) == 0, num_ids)
    camids = np.tile(np.arange(per_id), num_ids)
    q_g, q_q, g_g = distances(feats[is_query], feats[~is_query])
    labels = (pids[is_query], pids[~is_query], camids[is_query], camids[~is_query])
    before = rank_metrics(q_g, *labels)["mAP"]
    after = rank_metrics(re_ranking(q_g, q_q, g_g), *labels)["mAP"]
    assert after > before + 0.02


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_q_dist": np.zeros((3, 2))}, "q_q_dist must have shape"),
        ({"q_g_dist": -np.ones((2, 3))}, "non-negative"),
        ({"k1": 0}, "k1 and k2"),
        ({"lambda_value": 1.5}, "lambda_value"),
    ],
)
def test_invalid_arguments_raise(change, message):
    arguments = {
        "q_g_dist": np.ones((2, 3)),
        "q_q_dist": np.ones((2, 2)),
        "g_g_dist": np.ones((3, 3)),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        re_ranking(**arguments)
