"""What a run shows while it trains: progress, validation results, a model summary.

``console_callbacks(cfg.progress, ...)`` builds them from the ``progress`` config:

- ``progress.mode``: ``bar`` is Lightning's Rich progress bar; ``lines`` a plain line every
  ``progress.every_n_steps`` training steps (or after ``progress.every_n_seconds`` without one), readable in
  a file (SLURM, nohup, ``| tee``); ``auto`` is the bar when stdout is a terminal and lines otherwise;
  ``off`` shows neither. With the bar the lines still go to the run's log file.
- ``ValidationSummary``: one line per validation (epoch, mAP, R1, mINP, best mAP so far and its epoch).
- ``CompactModelSummary``: the parameters per top-level part and in total, without Lightning's FLOPs
  column and total (always 0: it needs an example input).

Everything is written with ``logging`` on rank zero, so Hydra's job logging puts it on the console and in
``<run_dir>/<job name>.log`` alike. Epochs are counted from 1 in these lines.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

from reidreg.training.callbacks.throughput import ThroughputMonitor
from reidreg.utils.console import FILE_ONLY_LOGGER

log = logging.getLogger(__name__)


def resolve_progress_mode(mode: str, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off``; ``auto`` is ``bar`` when ``stream`` (stdout) is a terminal."""
    if mode != "auto":
        return mode
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, with a day count beyond 24 h (``2d 03:04:05``)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"


def _epoch_label(trainer: pl.Trainer) -> str:
    epoch = trainer.current_epoch + 1
    max_epochs = trainer.max_epochs
    return f"epoch {epoch}/{max_epochs}" if max_epochs is not None and max_epochs > 0 else f"epoch {epoch}"


class ProgressLines(pl.Callback):
    """A plain progress line every ``every_n_steps`` training steps, or after ``every_n_seconds`` without one.

    ``epoch 3/120  step 150/200  global 550  loss 4.1873  421.6 img/s  ETA 1:02:13``

    The loss is ``pl_module.last_step_loss`` (a 0-dim tensor kept on the device, or None), read only when a
    line is printed, so the device is not synchronised in other steps. img/s and the ETA come from the
    ``ThroughputMonitor`` (steady state); the ETA adds the mean validation time per validation left and
    leaves out the final test. Steps are counted over the whole run, so lines come at the same steps
    whatever the epoch length.
    """

    def __init__(
        self,
        throughput: ThroughputMonitor,
        *,
        every_n_steps: int = 50,
        every_n_seconds: float | None = 300.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.throughput = throughput
        self.every_n_steps, self.every_n_seconds = every_n_steps, every_n_seconds
        self.logger = logger or log
        self._clock = clock
        self._last_line = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_line = self._clock()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        batches = trainer.num_training_batches
        done = trainer.current_epoch * batches + batch_idx + 1 if math.isfinite(batches) else batch_idx + 1
        now = self._clock()
        late = self.every_n_seconds is not None and now - self._last_line >= self.every_n_seconds
        if done % self.every_n_steps and not late:
            return
        self._last_line = now
        self.logger.info(self.line(trainer, pl_module, batch_idx))

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> str:
        batches = trainer.num_training_batches
        of = f"/{batches}" if math.isfinite(batches) else ""
        parts = [_epoch_label(trainer), f"step {batch_idx + 1}{of}", f"global {trainer.global_step}"]
        loss = getattr(pl_module, "last_step_loss", None)
        parts.append(f"loss {float(loss):.4f}" if loss is not None else "loss -")  # the one host sync
        speed = self.throughput.summary()
        if speed["train_img_per_s"] is None:
            parts.append("img/s - (warming up)")
        else:
            parts.append(f"{speed['train_img_per_s']:.1f} img/s")
            eta = self.eta_seconds(trainer, batch_idx, speed["train_ms_per_step"] / 1000)
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def eta_seconds(self, trainer: pl.Trainer, batch_idx: int, step_s: float) -> float | None:
        """Training time left: steps left × steady step time + validations left × mean validation time."""
        batches, max_epochs, epoch = trainer.num_training_batches, trainer.max_epochs, trainer.current_epoch
        limits = []
        if max_epochs is not None and max_epochs >= 0 and math.isfinite(batches):
            limits.append((max_epochs - epoch) * batches - (batch_idx + 1))
        if trainer.max_steps >= 0:  # one optimizer step per batch, as in a standard step
            limits.append(trainer.max_steps - trainer.global_step)
        if not limits:
            return None
        eta = max(min(limits), 0) * step_s
        validation_s, every = self.throughput.mean_validation_seconds, trainer.check_val_every_n_epoch
        if (
            validation_s
            and every
            and max_epochs is not None
            and max_epochs >= 0
            and trainer.enable_validation
        ):
            eta += validation_s * (max_epochs // every - epoch // every)
        return eta


class ValidationSummary(pl.Callback):
    """One line per validation during ``fit``, with the best value so far and its epoch.

    ``epoch 10/120  val mAP 61.23 %  R1 70.01 %  mINP 34.09 %  (best 61.23 % @ epoch 10)``

    ``monitor`` is the selection metric (``checkpoint.monitor``); ``others`` are shown after it, taken from
    the same prefix (``val/R1``, ``val/mINP``). The best is the first epoch with the highest value, as
    ``ModelCheckpoint(mode="max")`` chooses ``best.ckpt``; it is saved in checkpoints, so a resumed run
    keeps it. Values are fractions, shown as percentages.
    """

    def __init__(self, monitor: str = "val/mAP", others: tuple[str, ...] = ("R1", "mINP")) -> None:
        self.monitor, self.others = monitor, others
        self.prefix = monitor.rpartition("/")[0]
        self.best: float | None = None
        self.best_epoch: int | None = None  # counted from 1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in metrics:
            return
        value, epoch = float(metrics[self.monitor]), trainer.current_epoch + 1
        if math.isfinite(value) and (self.best is None or value > self.best):
            self.best, self.best_epoch = value, epoch
        if not trainer.is_global_zero:
            return
        parts = [_epoch_label(trainer), f"{self.monitor.replace('/', ' ')} {100 * value:.2f} %"]
        for name in self.others:
            key = f"{self.prefix}/{name}" if self.prefix else name
            if key in metrics:
                parts.append(f"{name} {100 * float(metrics[key]):.2f} %")
        if self.best is not None:
            parts.append(f"(best {100 * self.best:.2f} % @ epoch {self.best_epoch})")
        log.info("  ".join(parts))


class CompactModelSummary(ModelSummary):
    """Lightning's model summary, compact and logged: parameters per top-level part and in total.

    Leaves out the FLOPs (0 without ``example_input_array``), the train/eval mode counts and parts without
    parameters (metrics, losses). Use with ``Trainer(enable_model_summary=False)``, which otherwise adds
    its own summary (or announces that it skips it).
    """

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        rows = [
            (name.strip(), kind.strip(), params.strip())
            for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"], strict=True)
            if params.strip() != "0"
        ]
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
        total, trainable = (
            get_human_readable_count(n).strip() for n in (total_parameters, trainable_parameters)
        )
        lines = [
            f"Model: {total} parameters, {trainable} trainable, {get_formatted_model_size(model_size)} MB"
        ]
        lines += [f"  {n:<{widths[0]}}  {t:<{widths[1]}}  {p:>{widths[2]}}" for n, t, p in rows]
        log.info("\n".join(lines))


def console_callbacks(
    progress: Mapping[str, Any],
    *,
    monitor: str | None,
    model_summary: bool = True,
    stream: TextIO | None = None,
) -> list[pl.Callback]:
    """The callbacks of what a run shows, from the ``progress`` config node (checked by reidreg.options).

    Always a ``ThroughputMonitor`` (first; its ``summary()`` is the run's performance record); a
    ``ValidationSummary`` of ``monitor`` unless it is None (no validation); ``ProgressLines`` unless the
    mode is ``off`` (to the log file only with the bar); ``RichProgressBar`` in ``bar`` mode (pass
    ``Trainer(enable_progress_bar=...)`` accordingly); a ``CompactModelSummary`` if ``model_summary``.
    ``stream`` is what ``auto`` tests for a terminal (default ``sys.stdout``).
    """
    mode = resolve_progress_mode(progress["mode"], stream)
    every_n_steps, every_n_seconds = progress["every_n_steps"], progress["every_n_seconds"]
    warmup_steps = progress["throughput_warmup_steps"]

    throughput = ThroughputMonitor(warmup_steps=warmup_steps)
    callbacks: list[pl.Callback] = [throughput]
    if monitor is not None:
        callbacks.append(ValidationSummary(monitor))
    if mode != "off":
        logger = log if mode == "lines" else logging.getLogger(FILE_ONLY_LOGGER)
        callbacks.append(
            ProgressLines(
                throughput, every_n_steps=every_n_steps, every_n_seconds=every_n_seconds, logger=logger
            )
        )
    if mode == "bar":
        callbacks.append(RichProgressBar(leave=True))
    if model_summary:
        callbacks.append(CompactModelSummary())
    return callbacks
