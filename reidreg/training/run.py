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
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from reidreg.errors import ConfigError, ReIDRegError, RunInterrupted, RunStopped, one_line
from reidreg.existing_run import finished_message, finished_results
from reidreg.metric_keys import REPORTED_METRICS, TEST, metric_key
from reidreg.models import build_reid_model
from reidreg.provenance import (
    DatasetSummary,
    collect_provenance,
    process_wall_time_s,
    provenance_for_wandb,
    save_source_patch,
    source_state,
    tested_checkpoint,
)
from reidreg.regularizers import TrainingPlan, build_regularizers
from reidreg.run_dir import (
    STORED_CONFIG_KEY,
    RunDir,
    RunLock,
    atomic_write,
    is_secondary_process,
    read_checkpoint,
)
from reidreg.training.callbacks.checkpointing import AtomicCheckpointIO, BestCheckpoint, ResumePoint
from reidreg.training.callbacks.divergence import DivergenceGuard
from reidreg.training.callbacks.progress import console_callbacks
from reidreg.training.callbacks.throughput import ThroughputMonitor
from reidreg.training.device_settings import (
    DeviceSettings,
    prepare_network,
    resolve_device_settings,
    with_fused_adam,
)
from reidreg.training.module import ReIDModule
from reidreg.training.resume import resumed_config
from reidreg.training.run_record import RunRecord
from reidreg.training.summary import log_run_summary
from reidreg.utils.cli import continue_logging_in, print_metrics_table, remove_unused_run_dir
from reidreg.utils.config import flatten, instantiate
from reidreg.utils.loggers import build_loggers, finish_wandb, wandb_group

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
    in_run_dir(resumed, old=checkpoint_config["paths"]["output_dir"])
    return resumed, str(ckpt_path), int(checkpoint["global_step"])


def in_run_dir(cfg: DictConfig, *, old: str) -> None:
    """Every option under the run's stored folder ``old`` moved to ``paths.output_dir`` (the stored config
    is resolved: the CSV logger's ``save_dir``, ``trainer.default_root_dir``), for a moved or copied run."""
    new = str(cfg.paths.output_dir)
    for key, value in flatten(OmegaConf.to_container(cfg)).items():
        if isinstance(value, str) and (value == old or value.startswith(old.rstrip(os.sep) + os.sep)):
            OmegaConf.update(cfg, key, new + value[len(old) :])


def original_run_dir(ckpt_path: Path, checkpoint_config: dict[str, Any]) -> Path:
    """Where the checkpoint's run lives: the folder holding ``checkpoints/`` (it may have been moved)."""
    folder = RunDir(ckpt_path.resolve().parent.parent)
    return folder.root if folder.config.is_file() else Path(checkpoint_config["paths"]["output_dir"])


def build_module(
    cfg: DictConfig, num_classes: int, run_dir: Path, settings: DeviceSettings | None = None
) -> ReIDModule:
    """The network, its losses and regularizers, wrapped in the LightningModule, set up for the device."""
    regularizers = build_regularizers(cfg.regularizer)
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
        # Before the resume point (both are Lightning Checkpoints, run last, in this order): every
        # last.ckpt holds the best of the validations before it. First: trainer.checkpoint_callback.
        callbacks.insert(0, BestCheckpoint(checkpoints, monitor=cfg.checkpoint.monitor))
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
    overrides["strategy"] = strategy_with_timeout(cfg)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_loggers(cfg, resume_step=resume_step),
        plugins=plugins,
        enable_checkpointing=True,
        **overrides,
    )
    return trainer, resume_point


def strategy_with_timeout(cfg: DictConfig) -> str | DDPStrategy:
    """``trainer.strategy`` as Lightning's registered DDP strategy of that name (``auto`` with several
    processes: ``ddp``, Lightning's choice) waiting ``distributed.timeout_s`` in a collective; any other
    strategy, or ``auto`` on one process, as it is."""
    name = "ddp" if cfg.trainer.strategy == "auto" and world_size(cfg) > 1 else cfg.trainer.strategy
    if name not in StrategyRegistry or not issubclass(StrategyRegistry[name]["strategy"], DDPStrategy):
        return name
    entry = StrategyRegistry[name]  # (its get() would build the strategy without the timeout)
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=cfg.distributed.timeout_s))


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
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    if trainer.is_global_zero:
        provenance, patch = run_provenance(cfg, datamodule, trainer, config_text)
        if ckpt_path is not None:  # a run never continues on other data
            record.check_same_data(provenance)
    run_dir.mkdir(parents=True, exist_ok=True)
    continue_logging_in(run_dir)
    if trainer.is_global_zero:  # the run directory is rank 0's, whichever node the others run on
        atomic_write(RunDir(run_dir).config, config_text)
        save_source_patch(RunDir(run_dir).patch, patch, resumed=ckpt_path is not None)
        record.start(
            provenance=provenance,
            resumed_from=ckpt_path,
            global_step=resume_step or 0,
            wandb_group=wandb_group(cfg),
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(provenance_for_wandb(provenance))
    try:
        with resume_point.listening():  # a stop signal in any phase: fit, test and what lies between
            results = fit_and_test(cfg, trainer, module, datamodule, run_dir, ckpt_path)
    except BaseException as error:
        if resume_point.received is not None and not isinstance(error, RunStopped):
            # Lightning's own SIGTERM stop, or the job's handler exiting after our save: one interruption.
            error = RunInterrupted(
                f"received {resume_point.received.name}; resume with ckpt_path={resume_point.path}"
            )
        if trainer.is_global_zero:
            status = error.status if isinstance(error, RunStopped) else "failed"
            reason = (
                one_line(error)
                if isinstance(error, ReIDRegError)
                else f"{type(error).__name__}: {one_line(error)}"
            )
            performance = run_cost(trainer)
            record.finish(status, reason=reason, performance=performance)
            finish_wandb(trainer.loggers, status, performance)
        if isinstance(error, RunInterrupted):
            raise error from None
        raise
    if trainer.is_global_zero:
        performance = run_cost(trainer)
        if "checkpoint_epoch" in results:
            record.data["tested_checkpoint"] = {
                "epoch": results["checkpoint_epoch"],
                "global_step": results["checkpoint_global_step"],
            }
        record.finish("finished", performance=performance)
        finish_wandb(trainer.loggers, "finished", performance)
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
    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)), None)
    if best is not None and best.best_model_score is not None:  # restored by a resume, moved or not
        results["val/best_mAP"] = float(best.best_model_score)
        for logger in trainer.loggers:  # W&B sweeps select on it (sweeps/wandb/l2_search_*.yaml)
            logger.log_metrics({"val/best_mAP": results["val/best_mAP"]}, step=trainer.global_step)
    if cfg.test:
        best_path = best.best_model_path if best is not None else ""
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        results.update(test[0])
        if trainer.is_global_zero:
            checkpoint = best_path or "final weights (no validation hold-out)"
            tested = module.test_metric.last_result  # float64 (Lightning logs float32) and every query
            results.update({metric_key(TEST, key): float(tested[key]) for key in REPORTED_METRICS})
            results.update(num_valid_queries=tested["num_valid_queries"], num_queries=tested["num_queries"])
            tested["per_query"].save(RunDir(run_dir).per_query)
            tested_weights = tested_checkpoint(
                best_path, epoch=trainer.current_epoch - 1, global_step=trainer.global_step
            )
            results.update(
                checkpoint_epoch=tested_weights["epoch"], checkpoint_global_step=tested_weights["global_step"]
            )
            atomic_write(
                RunDir(run_dir).test_metrics,
                json.dumps({**results, "checkpoint": str(checkpoint)}, indent=2) + "\n",
            )
            print_metrics_table(f"Test ({cfg.dataset.name})", results, REPORTED_METRICS)
    if trainer.is_global_zero:
        log_run_summary(run_dir, trainer.loggers)
    return results


def run_provenance(
    cfg: DictConfig, datamodule: Any, trainer: pl.Trainer, config_text: str
) -> tuple[dict[str, Any], bytes | None]:
    """What produced this run (``reidreg.provenance``), after the Trainer set the numerics up, and the
    patch of its uncommitted source changes (None for a clean tree), to be saved as ``source.patch``."""
    dataset = DatasetSummary.of(
        datamodule.dataset,
        train=datamodule.train_samples,
        val_query=datamodule.val_query,
        val_gallery=datamodule.val_gallery,
        options=OmegaConf.to_container(cfg.dataset.options),
        content_hash=datamodule.content_hash,  # hashed by the image check, even when it is off
    )
    source = source_state()
    provenance = collect_provenance(
        cfg,
        dataset=dataset,
        precision=str(trainer.precision),
        device=trainer.strategy.root_device,
        num_devices=trainer.world_size,
        config_text=config_text,
        source=source,
    )
    return provenance, source.patch


def run_cost(trainer: pl.Trainer) -> dict[str, Any]:
    """run.json's ``performance``: the training speed and memory, and the whole process's wall time
    (imports, data generation and the image check included)."""
    return {**throughput_of(trainer).summary(), "process_wall_time_s": process_wall_time_s()}


def throughput_of(trainer: pl.Trainer) -> ThroughputMonitor:
    return next(c for c in trainer.callbacks if isinstance(c, ThroughputMonitor))
