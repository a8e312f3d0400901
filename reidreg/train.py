"""``python -m reidreg.train [overrides]``: train, validate, test and log one ReID model.

``main`` is a thin ``@hydra.main`` wrapper; ``train(cfg)`` is the plain function tests call directly.
Reading order for a newcomer: ``train`` → ``reidreg.data.datamodule`` → ``reidreg.models.ReIDModel``
→ ``reidreg.training.ReIDModule.training_step`` → ``reidreg.evaluation``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from reidreg.errors import ConfigError
from reidreg.regularizers import build_regularizers
from reidreg.training.module import REPORTED_METRICS, ReIDModule
from reidreg.utils.cli import print_metrics_table, run_cli
from reidreg.utils.config import instantiate, register_resolvers
from reidreg.utils.loggers import build_loggers

log = logging.getLogger(__name__)
register_resolvers()


def build_module(cfg: DictConfig, num_classes: int, run_dir: Path) -> ReIDModule:
    """The network, its losses and regularizers, wrapped in the LightningModule."""
    regularizers = build_regularizers(cfg.regularizer)
    if any(r.replaces_weight_decay for r in regularizers.values()) and cfg.optim.optimizer.get(
        "weight_decay"
    ):
        raise ConfigError(
            f"optim.optimizer.weight_decay={cfg.optim.optimizer.weight_decay} with an L2 regularizer would "
            "count L2 twice; set optim.optimizer.weight_decay=0."
        )
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone), num_classes=num_classes)
    module = ReIDModule(
        model=model,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optim.optimizer),
        schedule=OmegaConf.to_container(cfg.optim.schedule),
        regularizers=regularizers,
        freeze_backbone_epochs=cfg.freeze_backbone_epochs,
        flip_test=cfg.evaluation.flip,
        eval_metric=cfg.evaluation.metric,
        rerank_test=cfg.evaluation.rerank,
        run_dir=run_dir,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def build_trainer(cfg: DictConfig, run_dir: Path, *, validate: bool) -> pl.Trainer:
    checkpoints = run_dir / "checkpoints"
    # "last" is written at every epoch end (the resume point); "best" only when the validation mAP improves.
    last = pl.callbacks.ModelCheckpoint(
        dirpath=checkpoints, filename="last", save_on_train_epoch_end=True, enable_version_counter=False
    )
    callbacks: list[pl.Callback] = [last]
    if validate:
        best = pl.callbacks.ModelCheckpoint(
            dirpath=checkpoints,
            filename="best",
            monitor=cfg.checkpoint.monitor,
            mode="max",
            enable_version_counter=False,
        )
        callbacks.insert(0, best)  # first: trainer.checkpoint_callback is the "best" one
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(pl.callbacks.RichProgressBar(leave=True))
    overrides: dict[str, Any] = {} if validate else {"limit_val_batches": 0}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg), **overrides)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and (unless ``cfg.test`` is false) test; returns the test metrics and ``val/best_mAP``."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    # Built before the Trainer so that bad input (dataset folder, backbone, options) fails here, clearly.
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    module = build_module(cfg, datamodule.num_classes, run_dir)
    trainer = build_trainer(cfg, run_dir, validate=datamodule.has_validation)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    results: dict[str, float] = {}
    if datamodule.has_validation and trainer.checkpoint_callback.best_model_score is not None:
        results["val/best_mAP"] = float(trainer.checkpoint_callback.best_model_score)
        for logger in trainer.loggers:  # W&B sweeps select on it (sweeps/wandb/l2_search_*.yaml)
            logger.log_metrics({"val/best_mAP": results["val/best_mAP"]}, step=trainer.global_step)
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if datamodule.has_validation else ""
        results.update(trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0])
        if trainer.is_global_zero:
            checkpoint = best or "final weights (no validation hold-out)"
            (run_dir / "test_metrics.json").write_text(
                json.dumps({**results, "checkpoint": str(checkpoint)}, indent=2) + "\n"
            )
            print_metrics_table(f"Test ({cfg.dataset.name})", results, REPORTED_METRICS)
    if trainer.is_global_zero:
        log.info("Run directory: %s", run_dir.resolve())
        for name, path in [
            ("resolved config", run_dir / "config.yaml"),
            ("CSV metrics", run_dir / "csv" / "metrics.csv"),
            ("checkpoints", run_dir / "checkpoints"),
            ("test metrics", run_dir / "test_metrics.json"),
        ]:
            if path.exists():
                print(f"  {name:16s} {path}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = run_cli(train, cfg)
    # For sweepers that optimise a value (the Optuna L2 search): the validation mAP of the best checkpoint,
    # never a test metric, so that a search does not select on the test set.
    return results.get("val/best_mAP")


if __name__ == "__main__":
    main()
