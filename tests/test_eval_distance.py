"""evaluate() and pairwise_distance(): chunking, metrics, devices, validation."""

import numpy as np
import pytest
import torch

from reidreg.evaluation import METRICS, evaluate, pairwise_distance, rank_metrics


def clustered_features(rng, centres, *, per_id, noise):
    pids = np.repeat(np.arange(1, len(centres) + 1), per_id)
    feats = centres[pids - 1] + noise * rng.standard_normal((len(pids), centres.shape[1]))
    return feats.astype(np.float32), pids


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, 16))
    q_feats, q_pids = clustered_features(rng, centres, per_id=3, noise=1.0)
    g_feats, g_pids = clustered_features(rng, centres, per_id=8, noise=1.0)
    return {
        "q_feats": q_feats,
        "g_feats": g_feats,
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_camids": rng.integers(0, 3, len(q_pids)),
        "g_camids": rng.integers(0, 3, len(g_pids)),
    }


def labels(problem):
    return [problem[key] for key in ("q_pids", "g_pids", "q_camids", "g_camids")]


def test_distance_definitions(problem):
    q, g = problem["q_feats"].astype(np.float64), problem["g_feats"].astype(np.float64)
    q_unit = q / np.linalg.norm(q, axis=1, keepdims=True)
    g_unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    cosine = pairwise_distance(problem["q_feats"], problem["g_feats"], "cosine").numpy()
    np.testing.assert_allclose(cosine, 1 - q_unit @ g_unit.T, atol=1e-5)
    euclidean = pairwise_distance(problem["q_feats"], problem["g_feats"], "euclidean").numpy()
    np.testing.assert_allclose(euclidean, ((q[:, None] - g[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-3)


def test_cosine_distance_is_clamped_to_valid_range():
    feats = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    dist = pairwise_distance(feats, feats, "cosine")
    assert dist.min() >= 0 and dist.max() <= 2
    assert dist[0, 0] < 1e-6  # identical features
    assert dist[1, 0] == 1  # a zero feature has similarity 0 to everything


@pytest.mark.parametrize("metric", METRICS)
def test_chunked_equals_single_chunk_equals_rank_metrics(problem, metric):
    whole = evaluate(
        problem["q_feats"], problem["g_feats"], *labels(problem), metric=metric, chunk_size=10**6
    )
    chunked = evaluate(problem["q_feats"], problem["g_feats"], *labels(problem), metric=metric, chunk_size=5)
    distmat = pairwise_distance(problem["q_feats"], problem["g_feats"], metric)
    direct = rank_metrics(distmat, *labels(problem))
    for result in (chunked, direct):
        assert result["num_valid_queries"] == whole["num_valid_queries"]
        assert result["mAP"] == pytest.approx(whole["mAP"], abs=1e-9)
        assert result["mINP"] == pytest.approx(whole["mINP"], abs=1e-9)
        np.testing.assert_allclose(result["cmc"], whole["cmc"], atol=1e-9)
    assert 0.3 < whole["mAP"] <= 1  # clustered features: far better than chance


def test_torch_and_numpy_features_agree(problem):
    from_numpy = evaluate(problem["q_feats"], problem["g_feats"], *labels(problem), max_rank=10)
    as_tensors = [torch.from_numpy(problem[key]) for key in ("q_feats", "g_feats")]
    from_torch = evaluate(*as_tensors, *(torch.from_numpy(x) for x in labels(problem)), max_rank=10)
    assert from_torch["mAP"] == pytest.approx(from_numpy["mAP"], abs=1e-9)
    assert len(from_torch["cmc"]) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_features(problem):
    on_cpu = evaluate(problem["q_feats"], problem["g_feats"], *labels(problem))
    on_gpu = evaluate(
        *(torch.from_numpy(problem[key]).cuda() for key in ("q_feats", "g_feats")), *labels(problem)
    )
    assert on_gpu["mAP"] == pytest.approx(on_cpu["mAP"], abs=1e-4)


def test_rerank_path_runs_and_keeps_protocol(problem):
    result = evaluate(problem["q_feats"], problem["g_feats"], *labels(problem), rerank=True)
    plain = evaluate(problem["q_feats"], problem["g_feats"], *labels(problem))
    assert result["num_valid_queries"] == plain["num_valid_queries"]
    assert 0 < result["mAP"] <= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metric": "manhattan"}, "unknown metric 'manhattan'; allowed: cosine, euclidean"),
        ({"g_feats": np.zeros((96, 5), np.float32)}, "dimension"),
        ({"q_feats": np.zeros(36, np.float32)}, "q_feats must be 2-D"),
        ({"q_pids": np.zeros(35, int)}, "q_pids has 35 entries"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_arguments_raise(problem, change, message):
    arguments = {**problem, **change}
    with pytest.raises(ValueError, match=message):
        evaluate(**arguments)
