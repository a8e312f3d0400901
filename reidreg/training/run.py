"""One training run, top to bottom: resume → build and check everything → record → fit → test → record.

Everything that can be wrong with the request (options, data, backbone, regularizer plans, folders) is
found while building, before the run directory receives anything: a run that never started leaves no
half-results. From the first write on, ``run.json`` says what the run is: ``running``, then ``finished``,
``failed``, ``diverged`` or ``interrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from reidreg.errors import ConfigError, ReIDRegError, RunInterrupted, RunStopped, one_line
from reidreg.existing_run import finished_message, finished_results
from reidreg.models import build_reid_model
from reidreg.provenance import DatasetSummary, collect_provenance, provenance_for_wandb
from reidreg.regularizers import TrainingPlan, build_regularizers
from reidreg.run_dir import (
    BEST,
    STORED_CONFIG_KEY,
    RunDir,
    RunLock,
    atomic_write,
    is_secondary_process,
    read_checkpoint,
)
from reidreg.training.checkpointing import AtomicCheckpointIO, ResumePoint
from reidreg.training.divergence import DivergenceGuard
from reidreg.training.module import REPORTED_METRICS, ReIDModule
from reidreg.training.performance import (
    DeviceSettings,
    prepare_network,
    resolve_device_settings,
    with_fused_adam,
)
from reidreg.training.progress import console_callbacks
from reidreg.training.resume import resumed_config
from reidreg.training.run_record import RunRecord
from reidreg.training.summary import log_run_summary
from reidreg.training.throughput import ThroughputMonitor
from reidreg.utils.cli import continue_logging_in, print_metrics_table, remove_unused_run_dir
from reidreg.utils.config import instantiate
from reidreg.utils.loggers import build_loggers

log = logging.getLogger(__name__)
# Emitted by Lightning's own code under torch >= 2.10 at every step; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def resolve_resume(
    cfg: DictConfig, overrides: Sequence[str] | None, compose: Callable | None
) -> tuple[DictConfig, str | None, int | None]:
    """The run's config, the checkpoint it continues and that checkpoint's global step (``None`` for a new
    run).

    ``ckpt_path`` given: that checkpoint's experiment (``reidreg.training.resume``). ``ckpt_path`` null and
    the run directory already holds ``checkpoints/last.ckpt`` (a requeued job, or a run started again in
    its own folder): it continues from there, with the same experiment checks.
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        auto = RunDir(cfg.paths.output_dir).last
        if not auto.is_file():
            return cfg, None, None
        log.info("The run directory holds %s: resuming from it", auto)
        try:  # the job's own config must be the checkpoint's experiment
            return resolve_resume(OmegaConf.merge(cfg, {"ckpt_path": str(auto)}), None, None)
        except ConfigError as error:
            raise ConfigError(
                f"the run directory {auto.parent.parent} already holds a run of another experiment "
                f"({error}); give this run its own directory (hydra.run.dir)"
            ) from None
    checkpoint = read_checkpoint(ckpt_path)
    checkpoint_config = checkpoint[STORED_CONFIG_KEY]
    resumed = resumed_config(cfg, checkpoint_config, overrides=overrides, compose=compose)
    resumed.ckpt_path = str(ckpt_path)
    output_dir_given = any(o.split("=")[0].lstrip("+") == "paths.output_dir" for o in overrides or [])
    if overrides is not None and not output_dir_given:  # the CLI continues the run in its own folder
        resumed.paths.output_dir = str(original_run_dir(Path(ckpt_path), checkpoint_config))
    return resumed, str(ckpt_path), int(checkpoint["global_step"])


def original_run_dir(ckpt_path: Path, checkpoint_config: dict[str, Any]) -> Path:
    """Where the checkpoint's run lives: the folder holding ``checkpoints/`` (it may have been moved)."""
    folder = RunDir(ckpt_path.resolve().parent.parent)
    return folder.root if folder.config.is_file() else Path(checkpoint_config["paths"]["output_dir"])


def build_module(
    cfg: DictConfig, num_classes: int, run_dir: Path, settings: DeviceSettings | None = None
) -> ReIDModule:
    """The network, its losses and regularizers, wrapped in the LightningModule, set up for the device."""
    regularizers = build_regularizers(cfg.regularizer)
    if any(r.replaces_weight_decay for r in regularizers.values()) and cfg.optim.optimizer.get(
        "weight_decay"
    ):
        raise ConfigError(
            f"optim.optimizer.weight_decay={cfg.optim.optimizer.weight_decay} with an L2 regularizer would "
            "count L2 twice; set optim.optimizer.weight_decay=0."
        )
    settings = settings or resolve_device_settings(accelerator="cpu", precision=32)
    model = build_reid_model(cfg.model, backbone=instantiate(cfg.backbone), num_classes=num_classes)
    module = ReIDModule(
        model=model,
        loss=instantiate(cfg.loss),
        optimizer=with_fused_adam(instantiate(cfg.optim.optimizer), settings),
        schedule=OmegaConf.to_container(cfg.optim.schedule),
        regularizers=regularizers,
        freeze_backbone_epochs=cfg.freeze_backbone_epochs,
        flip_test=cfg.evaluation.flip,
        eval_metric=cfg.evaluation.metric,
        rerank_test=cfg.evaluation.rerank,
        run_dir=run_dir,
    )
    prepare_network(module.model, settings)  # after the regularizers attached (hooks), before optimizers
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def build_trainer(
    cfg: DictConfig, run_dir: Path, *, validate: bool, resume_step: int | None, settings: DeviceSettings
) -> tuple[pl.Trainer, ResumePoint]:
    checkpoints = RunDir(run_dir).checkpoints
    resume_point = ResumePoint(
        checkpoints,
        every_n_steps=cfg.checkpoint.every_n_steps,
        signals=tuple(cfg.checkpoint.signals),
        requeue=cfg.checkpoint.requeue,
    )
    guard = DivergenceGuard(
        factor=cfg.divergence.factor,
        reference_steps=cfg.divergence.reference_steps,
        check_every_n_steps=cfg.divergence.check_every_n_steps,
    )
    # The guard vets every checkpoint (last and best) while it is assembled, before anything is written.
    callbacks: list[pl.Callback] = [guard, resume_point]
    if validate:
        best = pl.callbacks.ModelCheckpoint(
            dirpath=checkpoints,
            filename=Path(BEST).stem,
            monitor=cfg.checkpoint.monitor,
            mode="max",
            enable_version_counter=False,
        )
        callbacks.insert(0, best)  # first: trainer.checkpoint_callback is the "best" one
    # What the run shows (cfg.progress): throughput (its summary() is run.json's "performance"), one line
    # per validation, the progress bar or plain lines, a compact model summary.
    callbacks += console_callbacks(
        cfg.progress,
        monitor=cfg.checkpoint.monitor if validate else None,
        model_summary=cfg.trainer.enable_model_summary,
    )
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # One preemption mechanism: ResumePoint saves last.ckpt and requeues; Lightning's would add its own.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    overrides: dict[str, Any] = {} if validate else {"limit_val_batches": 0}
    overrides["enable_progress_bar"] = any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks)
    overrides["enable_model_summary"] = False  # console_callbacks' CompactModelSummary replaces Lightning's
    overrides.update(settings.trainer_kwargs())  # precision (auto resolved) and cudnn.benchmark
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_loggers(cfg, resume_step=resume_step),
        plugins=plugins,
        enable_checkpointing=True,
        **overrides,
    )
    return trainer, resume_point


def world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    return per_node * int(cfg.trainer.get("num_nodes", 1) or 1)


def run_training(
    cfg: DictConfig, overrides: Sequence[str] | None = None, compose: Callable | None = None
) -> dict[str, float]:
    """Train and (unless ``cfg.test`` is false) test; returns the test metrics and ``val/best_mAP``."""
    cfg, ckpt_path, resume_step = resolve_resume(cfg, overrides, compose)
    run_dir = Path(cfg.paths.output_dir)
    finished = finished_results(run_dir, cfg)
    if finished is not None:  # e.g. a multirun relaunched into its sweep folder: this job is done
        log.info(finished_message(run_dir, finished))
        remove_unused_run_dir()  # the folder Hydra made for this command, if it is not the run's
        return finished
    if is_secondary_process():  # a rank started for DDP: rank 0 holds the directory
        return train_and_test(cfg, run_dir, ckpt_path, resume_step)
    with RunLock(run_dir):  # one live run per directory
        return train_and_test(cfg, run_dir, ckpt_path, resume_step)


def train_and_test(
    cfg: DictConfig, run_dir: Path, ckpt_path: str | None, resume_step: int | None
) -> dict[str, float]:
    """Build and check everything, then record, fit, test and record (the run directory is ours)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # Built and checked before the run directory gets anything: bad input fails here, in one line.
    settings = resolve_device_settings(
        accelerator=cfg.trainer.accelerator,
        precision=cfg.trainer.precision,
        deterministic=cfg.trainer.deterministic,
        compile=cfg.model.get("compile", False),
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    steps_per_epoch = datamodule.batches_per_epoch(world_size(cfg))
    module = build_module(cfg, datamodule.num_classes, run_dir, settings)
    plan = TrainingPlan(
        max_epochs=cfg.trainer.max_epochs,
        steps_per_epoch=steps_per_epoch,
        freeze_backbone_epochs=cfg.freeze_backbone_epochs,
        pretrained_backbone=bool(cfg.backbone.get("pretrained", False)),
        resuming=ckpt_path is not None,
    )
    for regularizer in module.regularizers.values():
        regularizer.check(plan)
    trainer, resume_point = build_trainer(
        cfg, run_dir, validate=datamodule.has_validation, resume_step=resume_step, settings=settings
    )
    datamodule.configure_device(
        cuda=settings.cuda,
        pin_memory=settings.pin_memory,
        channels_last=settings.channels_last,
        processes=trainer.num_devices,
    )
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP ranks started by Lightning rely on the first one
        datamodule.verify_images()  # every image decodes: fail now, not hours in

    record = RunRecord(run_dir)
    if trainer.is_global_zero:
        provenance = run_provenance(cfg, datamodule, trainer)
        if ckpt_path is not None:  # a run never continues on other data
            record.check_same_data(provenance)
    run_dir.mkdir(parents=True, exist_ok=True)
    continue_logging_in(run_dir)
    atomic_write(RunDir(run_dir).config, OmegaConf.to_yaml(cfg, resolve=True))
    if trainer.is_global_zero:
        record.start(provenance=provenance, resumed_from=ckpt_path, global_step=resume_step or 0)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(provenance_for_wandb(provenance))
    try:
        results = fit_and_test(cfg, trainer, module, datamodule, run_dir, ckpt_path)
    except BaseException as error:
        if trainer.is_global_zero:
            status = error.status if isinstance(error, RunStopped) else "failed"
            if resume_point.received is not None and not isinstance(error, RunStopped):
                status = RunInterrupted.status  # e.g. submitit's handler exited after our save
            reason = (
                one_line(error)
                if isinstance(error, ReIDRegError)
                else f"{type(error).__name__}: {one_line(error)}"
            )
            record.finish(status, reason=reason, performance=throughput_of(trainer).summary())
        raise
    if trainer.is_global_zero:
        performance = throughput_of(trainer).summary()
        record.finish("finished", performance=performance)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(provenance_for_wandb({}, performance))
    return results


def fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: ReIDModule,
    datamodule: Any,
    run_dir: Path,
    ckpt_path: str | None,
) -> dict[str, float]:
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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
            atomic_write(
                RunDir(run_dir).test_metrics,
                json.dumps({**results, "checkpoint": str(checkpoint)}, indent=2) + "\n",
            )
            print_metrics_table(f"Test ({cfg.dataset.name})", results, REPORTED_METRICS)
    if trainer.is_global_zero:
        log_run_summary(run_dir, trainer.loggers)
    return results


def run_provenance(cfg: DictConfig, datamodule: Any, trainer: pl.Trainer) -> dict[str, Any]:
    """What produced this run (``reidreg.provenance``); after the Trainer set the numerics up."""
    dataset = DatasetSummary.of(
        datamodule.dataset,
        train=datamodule.train_samples,
        val_query=datamodule.val_query,
        val_gallery=datamodule.val_gallery,
        options=OmegaConf.to_container(cfg.dataset.options),
    )
    return collect_provenance(
        cfg,
        dataset=dataset,
        precision=str(trainer.precision),
        device=trainer.strategy.root_device,
        num_devices=trainer.world_size,
    )


def throughput_of(trainer: pl.Trainer) -> ThroughputMonitor:
    return next(c for c in trainer.callbacks if isinstance(c, ThroughputMonitor))
