"""rank_metrics against a textbook per-query reference (stable argsort, the definitions written out)."""

import numpy as np
import pytest
import torch

from reidreg.evaluation import rank_metrics
from reidreg.evaluation import ranking as ranking_module
from reidreg.per_query import PerQuery


def reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Loop per query: stable argsort, drop same pid + same camera, AP / INP / CMC by definition."""
    columns = {"valid": [], "ap": [], "inp": [], "first_match_rank": []}
    for query in range(distmat.shape[0]):
        order = np.argsort(distmat[query], kind="stable")
        removed = (g_pids[order] == q_pids[query]) & (g_camids[order] == q_camids[query])
        is_match = (g_pids[order] == q_pids[query])[~removed]
        if not is_match.any():
            for name, value in zip(columns, (False, np.nan, np.nan, 0), strict=True):
                columns[name].append(value)
            continue
        match_ranks = np.flatnonzero(is_match) + 1
        precisions = [(i + 1) / rank for i, rank in enumerate(match_ranks)]
        values = (True, np.mean(precisions), len(match_ranks) / match_ranks[-1], match_ranks[0])
        for name, value in zip(columns, values, strict=True):
            columns[name].append(value)
    per_query = {name: np.array(values) for name, values in columns.items()}
    valid = per_query["valid"]
    if not valid.any():
        raise ValueError("no valid query")
    first_ranks = per_query["first_match_rank"][valid]
    return {
        "mAP": float(np.mean(per_query["ap"][valid])),
        "mINP": float(np.mean(per_query["inp"][valid])),
        "cmc": np.array([(first_ranks <= k).mean() for k in range(1, max_rank + 1)]),
        "num_valid_queries": int(valid.sum()),
        "num_queries": distmat.shape[0],
        "per_query": PerQuery(
            query_index=np.arange(distmat.shape[0]), pid=q_pids, camid=q_camids, **per_query
        ),
    }


def assert_same_metrics(result, expected):
    assert result["num_valid_queries"] == expected["num_valid_queries"]
    assert result["num_queries"] == expected["num_queries"]
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-12)
    assert result["cmc"].shape == expected["cmc"].shape
    np.testing.assert_allclose(result["cmc"], expected["cmc"], atol=1e-12)
    # Every query's own result, the queries without a valid match included (NaN AP and INP, rank 0).
    per_query, reference = result["per_query"], expected["per_query"]
    np.testing.assert_array_equal(per_query.query_index, np.arange(expected["num_queries"]))
    for name in ("pid", "camid", "valid", "first_match_rank"):
        np.testing.assert_array_equal(getattr(per_query, name), getattr(reference, name), err_msg=name)
    for name in ("ap", "inp"):
        expected_values = getattr(reference, name)
        np.testing.assert_allclose(getattr(per_query, name), expected_values, atol=1e-12, err_msg=name)
    # The reported mAP is the mean AP of the valid queries, to the last bit.
    assert per_query.ap[per_query.valid].mean() == result["mAP"]
    assert per_query.inp[per_query.valid].mean() == result["mINP"]


def random_problem(rng, *, num_query, num_gallery, num_ids, num_cameras, distances):
    q_pids = rng.integers(1, num_ids + 1, num_query)
    g_pids = rng.integers(0, num_ids + 1, num_gallery)  # pid 0: distractors, gallery only
    q_camids = rng.integers(0, num_cameras, num_query)
    g_camids = rng.integers(0, num_cameras, num_gallery)
    shape = (num_query, num_gallery)
    if distances == "continuous":
        distmat = rng.random(shape).astype(np.float32)
    elif distances == "few_values":  # many exact ties
        distmat = rng.integers(0, 4, shape).astype(np.float32)
    elif distances == "extreme":  # infinities, zeros, huge and tiny values, ties
        distmat = rng.choice(np.array([-np.inf, -1.0, 0.0, 1e-30, 2.0, 1e30, np.inf]), shape)
    else:  # "wide": float64 over many orders of magnitude, signed
        distmat = rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30)
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("distances", ["continuous", "few_values", "extreme", "wide"])
def test_matches_reference_on_random_problems(distances, monkeypatch):
    monkeypatch.setattr(ranking_module, "BLOCK_ROWS", 3)  # several blocks even for small problems
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        problem = random_problem(
            rng,
            num_query=int(rng.integers(1, 12)),
            num_gallery=int(rng.integers(1, 40)),
            num_ids=int(rng.integers(1, 6)),
            num_cameras=int(rng.integers(1, 4)),
            distances=distances,
        )
        max_rank = int(rng.integers(1, 60))  # often larger than the gallery
        try:
            expected = reference_metrics(*problem, max_rank)
        except ValueError:
            with pytest.raises(ValueError, match="no query has a true match"):
                rank_metrics(*problem, max_rank=max_rank)
            continue
        assert_same_metrics(rank_metrics(*problem, max_rank=max_rank), expected)
        checked += 1
    assert checked > 50


def test_larger_problem_with_many_threads_matches_reference():
    rng = np.random.default_rng(1)
    problem = random_problem(
        rng, num_query=150, num_gallery=3000, num_ids=60, num_cameras=6, distances="continuous"
    )
    assert_same_metrics(rank_metrics(*problem, max_rank=50), reference_metrics(*problem, 50))


def test_ties_follow_gallery_index_order():
    # Gallery 0 (other pid) and 1 (match) tie: 0 comes first, so the match has rank 2.
    result = rank_metrics(np.zeros((1, 2)), [1], [2, 1], [0], [1, 1], max_rank=3)
    assert result["mAP"] == 0.5 and result["mINP"] == 0.5
    np.testing.assert_array_equal(result["cmc"], [0.0, 1.0, 1.0])
    # Swapped: the match comes first.
    result = rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], max_rank=3)
    assert result["mAP"] == 1.0


def test_hand_computed_example():
    # Ranking by distance: g3 (match, cam 1), g0 (same pid, same cam: removed), g1 (other), g2 (match).
    distmat = np.array([[0.2, 0.3, 0.4, 0.1]])
    result = rank_metrics(distmat, [7], [7, 5, 7, 7], [0], [0, 1, 2, 1], max_rank=4)
    # Remaining order: g3 (rank 1), g1, g2 (rank 3). AP = (1/1 + 2/3) / 2, mINP = 2 / 3.
    assert result["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["cmc"], [1, 1, 1, 1])
    assert result["num_valid_queries"] == 1


def test_full_float64_range():
    # The span of the matches' distances overflows float64; binning must fall back, not produce NaN.
    distmat = np.array([[1e308, -1e308, 0.0, 5.0, np.inf], [-np.inf, 1e308, -1e308, 0.0, np.inf]])
    problem = (distmat, np.array([1, 2]), np.array([1, 2, 1, 2, 1]), np.array([0, 0]), np.ones(5, int))
    assert_same_metrics(rank_metrics(*problem, max_rank=5), reference_metrics(*problem, 5))


def test_queries_without_valid_match_are_skipped():
    distmat = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    # Query 0: match only in its own camera; query 1: pid absent; query 2: valid, match at rank 2.
    result = rank_metrics(distmat, [1, 9, 2], [1, 2], [0, 0, 0], [0, 1], max_rank=2)
    assert result["num_valid_queries"] == 1 and result["num_queries"] == 3
    assert result["mAP"] == pytest.approx(0.5)
    np.testing.assert_allclose(result["cmc"], [0.0, 1.0])
    per_query = result["per_query"]  # the skipped queries are kept, marked not valid
    np.testing.assert_array_equal(per_query.valid, [False, False, True])
    np.testing.assert_array_equal(per_query.pid, [1, 9, 2])
    np.testing.assert_array_equal(per_query.first_match_rank, [0, 0, 2])
    np.testing.assert_array_equal(per_query.ap, [np.nan, np.nan, 0.5])
    np.testing.assert_array_equal(per_query.inp, [np.nan, np.nan, 0.5])


def test_max_rank_beyond_gallery_keeps_last_value():
    result = rank_metrics(np.array([[0.5, 0.1]]), [1], [1, 2], [0], [1, 1], max_rank=5)
    np.testing.assert_allclose(result["cmc"], [0, 1, 1, 1, 1])


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(2)
    problem = random_problem(
        rng, num_query=20, num_gallery=60, num_ids=5, num_cameras=3, distances="continuous"
    )
    from_numpy = rank_metrics(*problem)
    from_torch = rank_metrics(*(torch.from_numpy(array) for array in problem))
    from_half = rank_metrics(torch.from_numpy(problem[0]).half(), *problem[1:])
    assert_same_metrics(from_torch, from_numpy)
    assert_same_metrics(from_half, reference_metrics(problem[0].astype(np.float16), *problem[1:], 50))
    assert isinstance(from_numpy["mAP"], float) and isinstance(from_numpy["num_valid_queries"], int)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensor_input():
    rng = np.random.default_rng(3)
    problem = random_problem(
        rng, num_query=20, num_gallery=60, num_ids=5, num_cameras=3, distances="continuous"
    )
    on_gpu = rank_metrics(*(torch.from_numpy(array).cuda() for array in problem))
    assert_same_metrics(on_gpu, reference_metrics(*problem, 50))


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no query has a true match in another camera"):
        rank_metrics(np.zeros((2, 2)), [1, 2], [1, 2], [0, 0], [0, 0])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.zeros(3), [1], [1, 2, 3], [0], [0, 0, 0]), "distmat must be 2-D"),
        ((np.zeros((2, 3)), [1], [1, 2, 3], [0, 0], [0, 0, 0]), "q_pids has 1 entries but there are 2"),
        ((np.zeros((2, 3)), [1, 1], [1, 2], [0, 0], [0, 0, 0]), "g_pids has 2 entries but there are 3"),
        ((np.zeros((1, 2)), [1], [1, 2], [0], [[0, 0]]), "g_camids must be 1-D"),
        ((np.zeros((1, 2)), [1.5], [1, 2], [0], [0, 0]), "q_pids must hold integers"),
        ((np.array([[np.nan, 0.0]]), [1], [1, 1], [0], [1, 1]), "NaN"),
    ],
)
def test_invalid_inputs_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        rank_metrics(*arguments)


def test_max_rank_must_be_positive():
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], max_rank=0)
