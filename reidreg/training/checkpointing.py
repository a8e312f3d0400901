"""Resume points: ``checkpoints/last.ckpt`` is always the newest, written atomically, also on preemption.

* ``AtomicCheckpointIO`` writes every checkpoint (``last`` and ``best``) to a temporary file in the same
  folder, flushes it to disk and renames it over the target: a kill at any moment leaves either the old
  file or the new one, never a truncated one. (Lightning's own writer stages the file in the system temp
  folder and *moves* it, which is a non-atomic copy when that folder is on another file system.)
* ``ResumePoint`` saves ``last.ckpt`` every ``every_n_steps`` optimizer steps (mid-epoch), at the end of every
  training epoch, and when the job is asked to stop by a signal (``signals``: SLURM sends SIGUSR1 or SIGUSR2
  before a preemption or time limit, then SIGTERM). The signal handler only records the signal; the
  checkpoint is written at the next safe point (after the current training step, or after the current
  validation), the job's own handler of that signal then runs (submitit's requeue, for example), and the
  run stops with ``RunInterrupted``. With ``requeue`` inside a SLURM job and no other handler, the job is
  requeued with ``scontrol requeue``; the requeued job finds ``last.ckpt`` in its run directory and resumes.

Every resume point restores the exact training state: weights, optimizers, loop progress, the sampler's
position (``ReIDDataModule.state_dict``) and the callbacks' state.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from reidreg.errors import RunInterrupted
from reidreg.run_dir import LAST, atomic_writer, remove_temporaries

log = logging.getLogger(__name__)

MULTIPROCESS_SIGNAL_CHECK_EVERY = 10  # steps between the ranks' agreement on a received stop signal


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``reidreg.run_dir.atomic_writer``: the old file or the new one, never half."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_writer(path) as file:
            torch.save(checkpoint, file)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


def signal_by_name(name: str) -> signal.Signals:
    try:
        return signal.Signals[name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


class ResumePoint(pl.Callback):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_steps`` steps (0: off), at epoch ends and on signals."""

    def __init__(
        self,
        dirpath: str | Path,
        *,
        every_n_steps: int = 0,
        signals: tuple[str, ...] = (),
        requeue: bool = True,
    ) -> None:
        self.path = Path(dirpath) / LAST
        self.every_n_steps, self.requeue = every_n_steps, requeue
        self.signals = tuple(signal_by_name(name) for name in signals)
        self._received: signal.Signals | None = None
        self._job_handlers: dict[signal.Signals, Any] = {}
        self._previous_handlers: dict[signal.Signals, Any] = {}

    # ------------------------------------------------------------------ when to save
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stop_requested(trainer):
            self._save_and_stop(trainer)
        elif (
            self.every_n_steps
            and trainer.global_step % self.every_n_steps == 0
            and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # saved at the epoch end
        ):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during validation: stop once it is complete (a half-done validation cannot be resumed).
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and self._stop_requested(trainer, boundary=True):
            self._save_and_stop(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        if not trainer.fast_dev_run:
            _save(trainer, self.path)

    # ------------------------------------------------------------------ signals
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero and self.path.parent.is_dir():
            remove_temporaries(self.path.parent)
        # The job's own handlers (submitit's requeue, for one), before Lightning installs its SIGTERM one.
        self._job_handlers = {number: signal.getsignal(number) for number in self.signals}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's SIGTERM handler (registered once setup is done), which it replaces:
        # Lightning's would stop the run at the epoch end, or in the middle of a validation, unsaved.
        for number in self.signals:
            self._previous_handlers[number] = signal.signal(number, self._record_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    @property
    def received(self) -> signal.Signals | None:
        """The stop signal received during this run, if any."""
        return self._received

    def _record_signal(self, number: int, frame: Any) -> None:
        # Only record: the training step in progress finishes first; saving happens in a callback hook.
        self._received = signal.Signals(number)

    def _stop_requested(self, trainer: pl.Trainer, *, boundary: bool = False) -> bool:
        if trainer.world_size == 1:
            return self._received is not None
        # All ranks must save and stop at the same step, and a signal may reach them at different times:
        # they agree every few steps (a collective, so not at every step) and at epoch and validation ends.
        boundary = boundary or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.global_step % MULTIPROCESS_SIGNAL_CHECK_EVERY and not boundary:
            return False
        flag = torch.tensor(float(self._received is not None), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        received = self._received or signal.SIGTERM
        _save(trainer, self.path)
        message = (
            f"received {received.name} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"resume point saved to {self.path}; resume with ckpt_path={self.path}"
        )
        log.warning(message)
        job_handler = self._job_handlers.get(received)
        self.teardown(trainer, trainer.lightning_module, "fit")
        if callable(job_handler):
            job_handler(received, None)  # e.g. submitit: requeues the job (and may exit the process here)
        elif self.requeue and trainer.is_global_zero:
            _requeue_slurm_job()
        raise RunInterrupted(message)


def _save(trainer: pl.Trainer, path: Path) -> None:
    # The loggers write out what they hold first: the history up to this step survives any later kill.
    for logger in trainer.loggers:
        logger.save()
    trainer.save_checkpoint(path, weights_only=False)


def _requeue_slurm_job() -> None:
    """``scontrol requeue <job>`` when running inside SLURM; the new job resumes from ``last.ckpt``."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("could not requeue SLURM job %s: %s", job, result.stderr.strip() or result.returncode)
