"""Training speed and peak memory of a run, measured in steady state (``ThroughputMonitor``).

What is measured, and what is left out:

- **ms/step**: the wall time between the ends of consecutive training batches of one epoch, after the first
  ``warmup_steps`` batches of the process (cuDNN autotuning, allocator growth, first loader batches). The
  first batch of each epoch opens a new measuring window and is not counted, so the epoch boundary
  (validation, checkpoint saving, loader restart) never enters the step time.
- **img/s**: the images of the counted batches (the first dimension of the batch's first tensor) divided
  by the same time, times the number of processes (``trainer.world_size``: every rank trains on a batch
  of the same size), i.e. the throughput of the whole job.
- **validation time** is timed separately (for the ETA of the progress lines).
- **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` of this process's device (tensors only,
  not the caching allocator's reserve); elsewhere the peak resident set size of this process
  (``resource.getrusage``; data-loader worker processes are not included). Read at the end of training,
  so evaluation after ``fit`` does not count.

On CUDA the device is synchronised only when a clock is read, i.e. at window boundaries (twice per epoch
and around each validation) and when ``summary()`` is called (every progress line, which reads the loss
and so synchronises anyway), never in every step.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

MEMORY_KINDS = ("cuda_max_memory_allocated", "process_peak_rss")


def batch_size(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch`` (a tensor, or a nest of tuples/lists/dicts)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = batch_size(item)
        if size:
            return size
    return 0


def peak_memory_mib(device: torch.device | None) -> tuple[float | None, str]:
    """``(MiB, kind)``: the CUDA allocator's peak on a CUDA device, else this process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, MEMORY_KINDS[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), MEMORY_KINDS[1]


class ThroughputMonitor(pl.Callback):
    """Measures steady-state training img/s, ms/step and peak memory; see the module docstring.

    ``clock`` (seconds, monotonic) is injectable for tests; every read of it is a CUDA synchronisation
    point, so the number of reads is the number of synchronisations.
    """

    def __init__(self, warmup_steps: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self._clock = clock
        self._device: torch.device | None = None
        self._world_size = 1
        self._batches_seen = 0  # training batches of this process, warm-up included
        self._window_start: float | None = None  # open measuring window: clock at its first batch end
        self._validation_start: float | None = None
        self._peak: tuple[float | None, str] | None = None  # read at the end of training
        self.steps = 0  # counted (steady-state) batches
        self.images = 0  # images of the counted batches, on this process
        self.seconds = 0.0  # their time, closed windows only
        self.validations = 0
        self.validation_seconds = 0.0

    # ------------------------------------------------------------------ clock
    def _now(self) -> float:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return self._clock()

    def _close_window(self) -> None:
        if self._window_start is not None:
            self.seconds += self._now() - self._window_start
            self._window_start = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device, self._world_size = pl_module.device, trainer.world_size
        self._peak = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_seen += 1
        if self._batches_seen <= self.warmup_steps:
            return
        if self._window_start is None:  # first batch after warm-up or of an epoch: the window starts here
            self._window_start = self._now()
            return
        self.steps += 1
        self.images += batch_size(batch)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._close_window()
        self._validation_start = self._now()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self.validation_seconds += self._now() - self._validation_start
            self.validations += 1
            self._validation_start = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()
        self._peak = peak_memory_mib(self._device)

    # ------------------------------------------------------------------ results
    @property
    def seconds_per_step(self) -> float | None:
        """Steady-state seconds per training batch so far (the open window included), or None."""
        seconds = self.seconds + (self._now() - self._window_start if self._window_start is not None else 0.0)
        return seconds / self.steps if self.steps else None

    @property
    def mean_validation_seconds(self) -> float | None:
        return self.validation_seconds / self.validations if self.validations else None

    def summary(self) -> dict[str, float | str | None]:
        """``train_img_per_s`` (whole job), ``train_ms_per_step``, ``peak_memory_mib`` and ``memory_kind``.

        The speeds are None when no step was measured (a run shorter than the warm-up plus one step).
        """
        step_s = self.seconds_per_step
        peak, kind = self._peak or peak_memory_mib(self._device)
        return {
            "train_img_per_s": self.images * self._world_size / (step_s * self.steps) if step_s else None,
            "train_ms_per_step": 1000 * step_s if step_s else None,
            "peak_memory_mib": peak,
            "memory_kind": kind,
        }
