"""Evaluation of a ``reidreg.train`` checkpoint on a test set: what ``python -m reidreg.evaluate`` runs.

The network and image settings are rebuilt from the config stored in the checkpoint; the test set is the
one it was trained for, or another one (cross-domain). Optionally: k-reciprocal re-ranking, a ranked-list
image and an adversarial attack on the query images (clean and attacked metrics).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from reidreg.attacks import build_attack
from reidreg.data.datamodule import ReIDDataModule
from reidreg.evaluation import evaluate
from reidreg.evaluation.robustness import evaluate_robustness
from reidreg.evaluation.visualize import save_ranked_lists
from reidreg.models import ReIDModel
from reidreg.models.checkpoint import build_model, load_checkpoint, resolve_device
from reidreg.run_dir import RunDir
from reidreg.training.module import REPORTED_METRICS
from reidreg.utils.cli import print_metrics_table

log = logging.getLogger(__name__)


def build_test_data(cfg: DictConfig, run_config: dict[str, Any]) -> ReIDDataModule:
    """The test set: the training run's image settings, with the dataset of ``cfg`` if one is chosen."""
    data = {k: v for k, v in run_config["data"].items() if k != "_target_"}
    if cfg.get("dataset"):
        data["dataset"] = cfg.dataset.name
        data["dataset_options"] = OmegaConf.to_container(cfg.dataset.options)
    data.update(
        root=cfg.paths.data_dir,
        val_identities=0,
        val_drop_mislabeled=False,  # no hold-out here, and another test set may have no known wrong labels
        batch_size_test=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    return ReIDDataModule(**data)


@torch.no_grad()
def extract(
    model: ReIDModel, loader: DataLoader, device: torch.device, *, flip: bool
) -> dict[str, torch.Tensor]:
    """Features and labels of a query+gallery loader, on ``device``, in the canonical order (queries then
    gallery, as the dataset lists them: the loader's batches carry each image's position in it)."""
    parts: dict[str, list[torch.Tensor]] = {"feats": [], "pids": [], "camids": [], "is_query": []}
    positions = []
    for images, pids, camids, is_query, position in loader:
        parts["feats"].append(model.extract_features(images.to(device), flip=flip))
        parts["pids"].append(pids)
        parts["camids"].append(camids)
        parts["is_query"].append(is_query)
        positions.append(position)
    order = torch.cat(positions).argsort()
    out = {key: torch.cat(values)[order.to(values[0].device)] for key, values in parts.items()}
    out["is_query"] = out["is_query"].bool()
    return out


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; writes ``eval_metrics.json``, every query's result (``test_per_query.npz``)
    and images into the run directory."""
    run_config, weights = load_checkpoint(cfg.ckpt_path)
    device = resolve_device(cfg.device)
    model = build_model(run_config, weights).to(device)
    datamodule = build_test_data(cfg, run_config)
    dataset = datamodule.load()
    loader = datamodule.test_dataloader()
    features = extract(model, loader, device, flip=cfg.flip)
    q, g = features["is_query"], ~features["is_query"]
    metrics = evaluate(
        features["feats"][q],
        features["feats"][g],
        features["pids"][q],
        features["pids"][g],
        features["camids"][q],
        features["camids"][g],
        metric=cfg.metric,
        rerank=cfg.rerank,
    )
    results: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "trained_on": run_config["dataset"]["name"],
        "dataset": dataset.name,
        "rerank": bool(cfg.rerank),
        **{f"test/{key}": float(metrics[key]) for key in ("mAP", "mINP")},
        **{f"test/R{k}": float(metrics["cmc"][k - 1]) for k in (1, 5, 10)},
        "num_valid_queries": metrics["num_valid_queries"],
        "num_queries": metrics["num_queries"],
    }
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics["per_query"].save(RunDir(output_dir).per_query)
    ranking = "re-ranked" if cfg.rerank else "no re-ranking"
    print_metrics_table(f"{results['trained_on']} → {dataset.name} ({ranking})", results, REPORTED_METRICS)

    if cfg.ranked_list.num_queries:
        path = save_ranked_lists(
            features,
            dataset.query,
            dataset.gallery,
            output_dir / "ranked_list.png",
            num_queries=cfg.ranked_list.num_queries,
            top_k=cfg.ranked_list.top_k,
            metric=cfg.metric,
            seed=cfg.ranked_list.seed,
        )
        log.info("  ranked list      %s", path)

    if cfg.get("attack"):
        attack = build_attack(**OmegaConf.to_container(cfg.attack))
        robustness = evaluate_robustness(
            model, loader, attack, metric=cfg.metric, flip=cfg.flip, seed=cfg.seed, rerank=cfg.rerank
        )
        results["attack"] = {
            "config": OmegaConf.to_container(cfg.attack),
            "rerank": bool(cfg.rerank),
            **robustness,
        }
        for name in ("clean", "attacked"):
            print_metrics_table(
                f"{name} queries ({cfg.attack.name}, eps={cfg.attack.eps:.4f}, {ranking})",
                {f"{name}/{k}": v for k, v in robustness[name].items()},
                REPORTED_METRICS,
            )
    (output_dir / "eval_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    log.info("  metrics          %s", output_dir / "eval_metrics.json")
    return results
