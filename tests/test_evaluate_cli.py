"""``reidreg.evaluate``: a checkpoint evaluated on its own and on another test set, with a ranked list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reidreg.errors import ConfigError
from reidreg.evaluate import evaluate_checkpoint
from reidreg.evaluation.checkpoint_eval import build_test_data
from reidreg.train import train
from reidreg.utils.config import register_resolvers
from tests.conftest import CONF_DIR, compose_config


def _evaluate_config(tmp_path: Path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[
                f"paths.data_dir={tmp_path.parent / 'data'}",
                f"paths.output_dir={tmp_path / 'eval'}",
                "num_workers=0",
                *overrides,
            ],
        )


@pytest.fixture
def trained_checkpoint(tiny_config) -> tuple[Path, dict]:
    cfg = tiny_config("trainer.max_epochs=1")
    results = train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt", results


def test_evaluating_the_best_checkpoint_reproduces_the_runs_test_metrics(tmp_path, trained_checkpoint):
    checkpoint, train_results = trained_checkpoint
    results = evaluate_checkpoint(
        _evaluate_config(tmp_path, f"ckpt_path={checkpoint}", "ranked_list.num_queries=3", "device=cpu")
    )
    for key in ("test/mAP", "test/R1", "test/mINP"):
        assert results[key] == pytest.approx(train_results[key], abs=1e-6)
    assert (tmp_path / "eval" / "ranked_list.png").is_file()
    saved = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert saved["test/mAP"] == pytest.approx(results["test/mAP"])


def test_cross_domain_evaluation_uses_the_other_dataset(tmp_path, trained_checkpoint):
    checkpoint, _ = trained_checkpoint
    results = evaluate_checkpoint(
        _evaluate_config(
            tmp_path,
            f"ckpt_path={checkpoint}",
            "dataset=synthetic",
            "dataset.options.num_ids=12",
            "dataset.options.num_cameras=2",
            "dataset.options.images_per_id=4",
            "dataset.options.seed=7",
            "rerank=true",
        )
    )
    assert results["dataset"] == "synthetic"
    assert results["rerank"] is True
    assert 0.0 <= results["test/mAP"] <= 1.0


def test_a_run_that_dropped_wrong_validation_labels_can_be_tested_on_a_real_dataset(tmp_path):
    run_config = OmegaConf.to_container(
        compose_config(tmp_path, "dataset.options.mislabeled_percent=30", "data.val_drop_mislabeled=true"),
        resolve=True,
    )
    cfg = _evaluate_config(tmp_path, "ckpt_path=run.ckpt", "dataset=market1501")
    data = build_test_data(cfg, run_config)
    assert (data.dataset_name, data.val_identities, data.val_drop_mislabeled) == ("market1501", 0, False)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing.ckpt"):
        evaluate_checkpoint(_evaluate_config(tmp_path, f"ckpt_path={tmp_path / 'nothing.ckpt'}"))


def test_attacked_queries_do_not_score_above_clean_ones(tmp_path, trained_checkpoint):
    checkpoint, train_results = trained_checkpoint
    results = evaluate_checkpoint(
        _evaluate_config(tmp_path, f"ckpt_path={checkpoint}", "attack=fgsm", "attack.eps=0.03")
    )
    clean, attacked = results["attack"]["clean"], results["attack"]["attacked"]
    assert clean["mAP"] == pytest.approx(train_results["test/mAP"], abs=1e-6)
    assert attacked["mAP"] <= clean["mAP"]


def test_attack_with_rerank_reranks_both_tables_and_says_so(tmp_path, trained_checkpoint, caplog):
    checkpoint, _ = trained_checkpoint
    overrides = (f"ckpt_path={checkpoint}", "attack=fgsm", "attack.eps=0.03", "rerank=true")
    with caplog.at_level("INFO", logger="reidreg.utils.cli"):
        results = evaluate_checkpoint(_evaluate_config(tmp_path, *overrides))
    assert results["attack"]["rerank"] is True
    assert results["attack"]["clean"]["mAP"] == pytest.approx(results["test/mAP"], abs=1e-6)  # re-ranked too
    titles = [r.getMessage().splitlines()[0] for r in caplog.records if r.name == "reidreg.utils.cli"]
    assert titles == [
        "synthetic → synthetic (re-ranked)",
        "clean queries (fgsm, eps=0.0300, re-ranked)",
        "attacked queries (fgsm, eps=0.0300, re-ranked)",
    ]
