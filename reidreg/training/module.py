"""The LightningModule: one training step of the AdaptiveReID baseline, with regularizers plugged in.

A standard step reads top to bottom (``training_step``):

1. every regularizer sees the step start and may replace the input images (adversarial training);
2. forward → one ``HeadOutput`` per objective module → task loss (label-smoothed CE + triplet per module);
3. every regularizer adds its loss terms (L2 penalties, SGSL) — each logged as ``reg/<name>/<term>``;
4. backward; regularizers act on the (unscaled) gradients in ``on_before_optimizer_step`` (SGP);
5. optimizer step. The learning rate is set at each epoch start (``training.schedule``).

Optimisation is manual (``automatic_optimization = False``) so that a regularizer can run a different
procedure with optimizers of its own (LinR) through the same ``optimize`` call; Lightning still handles
precision, DDP gradient sync and checkpointing of every optimizer.

Validation and test extract flip-averaged embeddings and evaluate them with ``ReIDMetric`` (gathered
across DDP ranks); the metrics are logged as ``val/*`` and ``test/*``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from reidreg.evaluation import ReIDMetric
from reidreg.losses import ReIDLoss
from reidreg.models import ReIDModel
from reidreg.regularizers import LogDict, TrainStep
from reidreg.run_dir import STORED_CONFIG_KEY
from reidreg.training.schedule import set_epoch_lr

REPORTED_METRICS = ("mAP", "R1", "R5", "R10", "mINP")


class ReIDModule(pl.LightningModule):
    """Trains a ``ReIDModel`` with a ``ReIDLoss`` and any number of regularizers."""

    def __init__(
        self,
        model: ReIDModel,
        loss: ReIDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        schedule: dict[str, Any] | None = None,
        regularizers: nn.ModuleDict | None = None,
        freeze_backbone_epochs: int = 0,
        flip_test: bool = True,
        eval_metric: str = "cosine",
        rerank_test: bool = False,
        run_dir: str | Path = ".",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.loss = model, loss
        self.regularizers = regularizers if regularizers is not None else nn.ModuleDict()
        self.optimizer_factory, self.schedule = optimizer, dict(schedule or {})
        self.freeze_backbone_epochs, self.flip_test = freeze_backbone_epochs, flip_test
        self.run_dir = Path(run_dir)
        self.val_metric = ReIDMetric(metric=eval_metric)
        self.test_metric = ReIDMetric(metric=eval_metric, rerank=rerank_test)
        self._pending_logs: dict[str, float | torch.Tensor] = {}  # this step's logs, see _flush_logs
        self.last_step_loss: torch.Tensor | None = None  # the loss optimised in the latest step
        # The resolved run config, stored in every checkpoint so that `reidreg.evaluate` can rebuild the run.
        self.run_config: dict[str, Any] | None = None
        for regularizer in self.regularizers.values():
            regularizer.attach(self)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        main = self.optimizer_factory(params=list(self.parameters()))
        extra = [opt for reg in self.regularizers.values() for opt in reg.extra_optimizers(self)]
        return [main, *extra]

    @property
    def main_optimizer(self):
        optimizers = self.optimizers()
        return optimizers[0] if isinstance(optimizers, list) else optimizers

    def optimize(self, loss: torch.Tensor, optimizer) -> None:
        """zero_grad → backward (AMP-scaled) → step; ``on_before_optimizer_step`` runs in between.

        The loss stays on the device as ``last_step_loss`` (for the divergence guard and progress display).
        """
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.last_step_loss = loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for regularizer in self.regularizers.values():
            self.log_regularizer(regularizer.name, regularizer.on_before_optimizer_step(self, optimizer))

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start: the epoch's state is set here too.
        self._apply_epoch_schedule()

    def on_train_epoch_start(self) -> None:
        lr = self._apply_epoch_schedule()
        # Straight to the loggers, at the epoch's first step: part of the history a resume point keeps.
        for logger in self.loggers:
            logger.log_metrics({"train/lr": lr, "epoch": self.current_epoch}, step=self.global_step)

    def _apply_epoch_schedule(self) -> float:
        """What depends on the epoch alone: the frozen-backbone phase and the learning rate (returned)."""
        # Optional head-only phase of the official code: the backbone (both copies of block 5) is frozen.
        trainable = self.current_epoch >= self.freeze_backbone_epochs
        for part in (self.model.backbone, self.model.regional_block5):
            if part is not None:
                part.requires_grad_(trainable)
        return set_epoch_lr(
            self.main_optimizer.optimizer,
            self.current_epoch,
            frozen_epochs=self.freeze_backbone_epochs,
            **self.schedule,
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._pending_logs = {}
        for regularizer in self.regularizers.values():
            regularizer.on_train_batch_start(self, batch_idx)
        for regularizer in self.regularizers.values():
            logs = regularizer.training_step(self, batch, batch_idx)
            if logs is not None:  # this regularizer runs its own procedure for this step (LinR)
                self.log_regularizer(regularizer.name, logs)
                self._flush_logs()
                return
        self._standard_step(*batch)
        self._flush_logs()

    def _standard_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for regularizer in self.regularizers.values():
            images, logs = regularizer.prepare_inputs(self, images, labels)
            self.log_regularizer(regularizer.name, logs)
        outputs = self.model(images)
        task_losses = self.loss(outputs, labels)
        step = TrainStep(
            model=self.model,
            images=images,
            labels=labels,
            outputs=outputs,
            task_losses=task_losses,
            global_step=self.global_step,
            epoch=self.current_epoch,
        )
        loss = task_losses["total"]
        for regularizer in self.regularizers.values():
            terms = regularizer.loss_terms(step)
            for term in terms.values():
                loss = loss + term
            self.log_regularizer(regularizer.name, terms)
        self.optimize(loss, self.main_optimizer)

        self._pending_logs["train/loss"] = loss.detach()
        for name, value in task_losses.items():
            if name != "total":
                self._pending_logs[f"train/{name}"] = value.detach()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            for regularizer in self.regularizers.values():
                regularizer.on_train_end(self)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_step(self, metric: ReIDMetric, batch: Any) -> None:
        images, *labels = batch  # pids, camids, is_query, positions (see ReIDDataModule)
        metric.update(self.model.extract_features(images, flip=self.flip_test), *labels)

    def _evaluation_end(self, metric: ReIDMetric, prefix: str) -> None:
        results = metric.compute()
        metric.reset()
        scalars = {f"{prefix}/{key}": float(results[key]) for key in REPORTED_METRICS}
        # Gathered over ranks by the metric, so identical on every rank: "max" over ranks is that value
        # exactly (a mean could round); unsynced epoch-level values make Lightning warn under DDP.
        self.log_dict(scalars, sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(self.val_metric, batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end(self.val_metric, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(self.test_metric, batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end(self.test_metric, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint[STORED_CONFIG_KEY] = self.run_config

    # ------------------------------------------------------------------ logging helpers
    def log_regularizer(self, name: str, values: LogDict) -> None:
        """Log a regularizer's values as ``reg/<name>/<key>`` at the end of the current step."""
        for key, value in values.items():
            self._pending_logs[f"reg/{name}/{key}"] = (
                value.detach() if isinstance(value, torch.Tensor) else value
            )

    def _flush_logs(self) -> None:
        """Write this step's values straight to the loggers, every ``trainer.log_every_n_steps`` steps.

        Not through ``self.log``: Lightning re-emits the last value of a key at steps that did not log it
        (misleading for a gated or phase-dependent term), and resets a batch's earlier logs when another
        hook (``on_before_optimizer_step``) logs in between. Values stay on the device until a step that
        writes them: reading a GPU value waits for the GPU, so it happens once per written step only.
        """
        if self.global_step % self.trainer.log_every_n_steps == 0 and self._pending_logs:
            values = {k: float(v) for k, v in self._pending_logs.items()}  # one synchronisation per write
            for logger in self.loggers:
                logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step - 1)

    def log_image(self, key: str, path: Path) -> None:
        """Send an image file to the loggers that take images (W&B); the file itself stays in the run dir."""
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)])
