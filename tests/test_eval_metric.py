"""ReIDMetric: accumulation over batches equals evaluate() on the concatenation; reset; validation."""

import numpy as np
import pytest
import torch

from reidreg.evaluation import ReIDMetric, evaluate


@pytest.fixture(scope="module")
def dataset():
    generator = torch.Generator().manual_seed(0)
    num_items = 90
    pids = torch.randint(1, 10, (num_items,), generator=generator)
    centres = torch.randn(10, 8, generator=generator)
    return {
        "feats": centres[pids] + 0.8 * torch.randn(num_items, 8, generator=generator),
        "pids": pids,
        "camids": torch.randint(0, 3, (num_items,), generator=generator),
        "is_query": torch.rand(num_items, generator=generator) < 0.25,  # queries and gallery interleaved
    }


def feed(metric, dataset, batch_size):
    for start in range(0, len(dataset["pids"]), batch_size):
        batch = {key: values[start : start + batch_size] for key, values in dataset.items()}
        metric.update(batch["feats"], batch["pids"], batch["camids"], batch["is_query"])


def expected_metrics(dataset, **kwargs):
    query, gallery = dataset["is_query"], ~dataset["is_query"]
    return evaluate(
        dataset["feats"][query],
        dataset["feats"][gallery],
        dataset["pids"][query],
        dataset["pids"][gallery],
        dataset["camids"][query],
        dataset["camids"][gallery],
        **kwargs,
    )


@pytest.mark.parametrize("metric_name", ["cosine", "euclidean"])
def test_accumulated_batches_equal_evaluate(dataset, metric_name):
    metric = ReIDMetric(metric=metric_name, max_rank=20)
    feed(metric, dataset, batch_size=16)
    result = metric.compute()
    expected = expected_metrics(dataset, metric=metric_name, max_rank=20)
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-9)
    np.testing.assert_allclose(result["cmc"], expected["cmc"])
    assert [result[f"R{k}"] for k in (1, 5, 10)] == pytest.approx(expected["cmc"][[0, 4, 9]].tolist())


def test_forward_only_accumulates(dataset):
    metric = ReIDMetric()
    for start in range(0, len(dataset["pids"]), 20):
        assert metric(*(values[start : start + 20] for values in dataset.values())) is None
    assert metric.compute()["mAP"] == pytest.approx(expected_metrics(dataset)["mAP"], abs=1e-9)


def test_reset_forgets_previous_batches(dataset):
    metric = ReIDMetric()
    feed(metric, {key: values.flip(0) for key, values in dataset.items()}, batch_size=7)
    metric.compute()
    metric.reset()
    feed(metric, dataset, batch_size=30)
    assert metric.compute()["mAP"] == pytest.approx(expected_metrics(dataset)["mAP"], abs=1e-9)


def test_rerank_and_small_max_rank(dataset):
    metric = ReIDMetric(max_rank=3, rerank=True)
    feed(metric, dataset, batch_size=45)
    result = metric.compute()
    assert result["mAP"] == pytest.approx(expected_metrics(dataset, max_rank=3, rerank=True)["mAP"])
    assert "R1" in result and "R5" not in result  # only ranks within max_rank are reported


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_invalid_use_raises(dataset):
    with pytest.raises(ValueError, match="unknown metric"):
        ReIDMetric(metric="hamming")
    metric = ReIDMetric()
    with pytest.raises(ValueError, match="is_query must have shape"):
        metric.update(dataset["feats"], dataset["pids"], dataset["camids"], dataset["is_query"][:5])
    with pytest.raises(ValueError, match="before any update"):
        ReIDMetric().compute()
