"""Every query's result: written by a real test and by ``reidreg.evaluate``, equal to the reported mAP,
small on disk, and refused when it is not such a file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reidreg.evaluate import evaluate_checkpoint
from reidreg.evaluation import ReIDMetric
from reidreg.per_query import PerQuery
from reidreg.run_dir import PER_QUERY_FILE, RunDir
from reidreg.train import train
from tests.test_evaluate_cli import _evaluate_config


def test_a_real_run_and_reidreg_evaluate_write_every_query_of_the_test(tiny_config, tmp_path):
    cfg = tiny_config("trainer.max_epochs=1")
    results = train(cfg)
    run = RunDir(cfg.paths.output_dir)
    saved = json.loads(run.test_metrics.read_text())
    per_query = PerQuery.load(run.per_query)
    # The file holds every query of the test set, in its order, with the dataset's own labels.
    splits = json.loads(run.run_json.read_text())["provenance"]["dataset"]["splits"]
    assert per_query.num_queries == saved["num_queries"] == splits["query"]["images"]
    np.testing.assert_array_equal(per_query.query_index, np.arange(per_query.num_queries))
    assert per_query.num_valid == saved["num_valid_queries"] > 0
    # The reported metrics are those of the valid queries, exactly.
    assert per_query.ap[per_query.valid].mean() == saved["test/mAP"] == results["test/mAP"]
    assert per_query.inp[per_query.valid].mean() == saved["test/mINP"]
    assert np.mean(per_query.first_match_rank[per_query.valid] == 1) == saved["test/R1"]
    assert np.isnan(per_query.ap[~per_query.valid]).all()
    assert (per_query.first_match_rank[~per_query.valid] == 0).all()

    # reidreg.evaluate on the tested checkpoint writes the same rows beside eval_metrics.json.
    evaluated = evaluate_checkpoint(
        _evaluate_config(tmp_path, f"ckpt_path={run.best}", "device=cpu", "flip=true")
    )
    again = PerQuery.load(tmp_path / "eval" / PER_QUERY_FILE)
    eval_json = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert eval_json["num_valid_queries"] == again.num_valid == per_query.num_valid
    assert eval_json["num_queries"] == again.num_queries
    assert again.mean_ap() == evaluated["test/mAP"]
    np.testing.assert_array_equal(again.pid, per_query.pid)
    np.testing.assert_array_equal(again.valid, per_query.valid)
    np.testing.assert_allclose(again.ap, per_query.ap, atol=1e-6)


def msmt17_sized(rng: np.random.Generator, num_queries: int = 11_659, num_ids: int = 3_060) -> PerQuery:
    """Plausible per-query results of an MSMT17 test: 3,060 identities, a few invalid queries."""
    valid = rng.random(num_queries) > 0.01
    first = np.where(valid, rng.geometric(0.4, num_queries), 0)
    return PerQuery(
        query_index=np.arange(num_queries),
        pid=np.sort(rng.integers(0, num_ids, num_queries)),
        camid=rng.integers(0, 15, num_queries),
        valid=valid,
        ap=np.where(valid, rng.beta(2, 1, num_queries), np.nan),
        inp=np.where(valid, rng.beta(1, 2, num_queries), np.nan),
        first_match_rank=first,
    )


def test_an_msmt17_sized_file_stays_under_one_megabyte_and_round_trips(tmp_path):
    per_query = msmt17_sized(np.random.default_rng(0))
    path = per_query.save(tmp_path / PER_QUERY_FILE)
    assert path.stat().st_size < 1_000_000
    loaded = PerQuery.load(path)
    for name in ("query_index", "pid", "camid", "valid", "ap", "inp", "first_match_rank"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(per_query, name), err_msg=name)
    assert loaded.ap.dtype == np.float64 and loaded.pid.dtype == np.int32
    assert loaded.mean_ap() == per_query.mean_ap()
    assert [p.name for p in tmp_path.iterdir()] == [PER_QUERY_FILE]  # no temporary left


def test_a_file_that_is_not_per_query_results_is_refused_naming_it(tmp_path):
    corrupt = tmp_path / "cut.npz"
    msmt17_sized(np.random.default_rng(1)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{corrupt} is not a per-query results file"):
        PerQuery.load(corrupt)
    other = tmp_path / "other.npz"
    np.savez(other, ap=np.zeros(3))
    with pytest.raises(ValueError, match="lacks the column"):
        PerQuery.load(other)


def test_the_metric_returns_every_query_and_keeps_it_after_reset():
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=generator)
    pids, camids = torch.arange(40) % 5, torch.arange(40) % 3
    is_query = torch.arange(40) < 10
    metric = ReIDMetric()
    metric.update(feats, pids, camids, is_query)
    result = metric.compute()
    metric.reset()
    per_query = result["per_query"]
    kept = metric.last_result
    assert kept["mAP"] == result["mAP"]
    np.testing.assert_array_equal(kept["per_query"].ap, per_query.ap)
    assert per_query.num_queries == 10 and per_query.num_valid == result["num_valid_queries"]
    assert per_query.mean_ap() == result["mAP"]
    np.testing.assert_array_equal(per_query.pid, pids[:10].numpy())
