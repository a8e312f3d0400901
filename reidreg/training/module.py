"""The LightningModule: the AdaptiveReID baseline trained by ``reidreg.training.step.TrainingStep``.

Each training batch runs the public step with this run's regularizers as plug-ins (input transforms, loss
terms, gradient transforms; see ``reidreg.regularizers.base``). Optimisation is manual
(``automatic_optimization = False``) so that a phase (LinR) can step optimizers of its own through the
same ``optimize`` call; Lightning still handles precision, the DDP gradient all-reduce and checkpointing
of every optimizer. Gradient transforms run in ``on_before_optimizer_step``: after AMP unscaling and the
all-reduce. The learning rate is set at each epoch start (``training.schedule``).

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
from reidreg.metric_keys import REPORTED_METRICS, TEST, VAL, metric_key
from reidreg.models import ReIDModel
from reidreg.regularizers import StepContext
from reidreg.run_dir import STORED_CONFIG_KEY
from reidreg.training.schedule import set_epoch_lr
from reidreg.training.step import TrainingStep


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
        self.step = TrainingStep(self.regularizers.values())
        self.context = StepContext(self.model, self.loss, stage="done")  # the current step's
        self.last_step_loss: torch.Tensor | None = None  # the loss optimised in the latest step
        # The resolved run config, stored in every checkpoint so that `reidreg.evaluate` can rebuild the run.
        self.run_config: dict[str, Any] | None = None
        for regularizer in self.regularizers.values():
            regularizer.attach(self)
        ignored = [
            f"regularizers.{reg.name}.{param}"
            for reg in self.regularizers.values()
            for param in reg.ddp_ignored_parameters()
        ]
        # Gradients set after the all-reduce, the same on every rank: DDP neither waits for nor averages them.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

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
        """A phase's optimizer step: zero_grad → backward (AMP-scaled) → step (no gradient transforms).

        The loss stays on the device as ``last_step_loss`` (for the divergence guard and progress display).
        """
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        self.last_step_loss = loss.detach()

    def lightning_optimizer(self, optimizer: torch.optim.Optimizer):
        """The Trainer's wrapper of ``optimizer``: its ``step`` does AMP unscaling, hooks, step counting."""
        optimizers = self.optimizers()
        for wrapped in optimizers if isinstance(optimizers, list) else [optimizers]:
            if getattr(wrapped, "optimizer", wrapped) is optimizer:
                return wrapped
        raise RuntimeError("an optimizer of a regularizer is not among the module's (configure_optimizers)")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step.transform_gradients(self.context, optimizer)

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
        images, labels = batch
        self.context = StepContext(
            self.model,
            self.loss,
            global_step=self.global_step,
            epoch=self.current_epoch,
            batch_idx=batch_idx,
            optimize=lambda loss, optimizer: self.optimize(loss, self.lightning_optimizer(optimizer)),
            stop=lambda: setattr(self.trainer, "should_stop", True),
        )
        main = self.main_optimizer
        loss = self.step(
            self.context,
            images,
            labels,
            main.optimizer,
            backward=self.manual_backward,
            optimizer_step=main.step,
        )
        if loss is not None:
            self.last_step_loss = loss
        self._flush_logs(self.context.logs)

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
        scalars = {metric_key(prefix, key): float(results[key]) for key in REPORTED_METRICS}
        # Gathered over ranks by the metric, so identical on every rank: "max" over ranks is that value
        # exactly (a mean could round); unsynced epoch-level values make Lightning warn under DDP.
        self.log_dict(scalars, sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(self.val_metric, batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end(self.val_metric, VAL)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(self.test_metric, batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end(self.test_metric, TEST)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint[STORED_CONFIG_KEY] = self.run_config

    # ------------------------------------------------------------------ logging helpers
    def _flush_logs(self, logs: dict[str, float | torch.Tensor]) -> None:
        """Write this step's values straight to the loggers, every ``trainer.log_every_n_steps`` steps.

        Not through ``self.log``: Lightning re-emits the last value of a key at steps that did not log it
        (misleading for a gated or phase-dependent term), and resets a batch's earlier logs when another
        hook (``on_before_optimizer_step``) logs in between. Values stay on the device until a step that
        writes them: reading a GPU value waits for the GPU, so it happens once per written step only.
        """
        if self.global_step % self.trainer.log_every_n_steps == 0 and logs:
            values = {k: float(v) for k, v in logs.items()}  # one synchronisation per write
            for logger in self.loggers:
                logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step - 1)

    def log_image(self, key: str, path: Path) -> None:
        """Send an image file to the loggers that take images (W&B); the file itself stays in the run dir."""
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)])
