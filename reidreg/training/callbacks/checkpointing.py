"""Resume points: ``checkpoints/last.ckpt`` is always the newest, written atomically, also on preemption.

* ``BestCheckpoint`` is Lightning's ``ModelCheckpoint`` writing ``best.ckpt``; it decides at the end of every
  validation, and a moved or copied run directory keeps its best (the stored paths are re-rooted).
* ``AtomicCheckpointIO`` writes every checkpoint (``last`` and ``best``) to a temporary file in the same
  folder, flushes it to disk and renames it over the target: a kill at any moment leaves either the old
  file or the new one, never a truncated one. (Lightning's own writer stages the file in the system temp
  folder and *moves* it, which is a non-atomic copy when that folder is on another file system.)
* ``ResumePoint`` saves ``last.ckpt`` every ``every_n_steps`` optimizer steps (mid-epoch), at the end of every
  training epoch, and when the job is asked to stop by a signal (``signals``: SLURM sends SIGUSR1 or SIGUSR2
  before a preemption or time limit, then SIGTERM). The signal handler only records the signal; the
  checkpoint is written at the next safe point: after the current training step, or, in the last step of
  an epoch or during a validation, at the end of that epoch (after its validation, so that the validation
  is not lost). The job's own handler of that signal then runs (submitit's requeue, for example), and the
  run stops with ``RunInterrupted``. A signal during the test stops it at the next batch (training is
  complete; the resumed run only tests). With ``requeue`` inside a SLURM job and no other handler, the job
  is requeued with ``scontrol requeue``; the requeued job finds ``last.ckpt`` in its run directory and
  resumes.

Every resume point restores the exact training state: weights, optimizers, loop progress, the sampler's
position (``ReIDDataModule.state_dict``) and the callbacks' state, ``best.ckpt``'s score and path included:
both callbacks are Lightning ``Checkpoint`` callbacks, which Lightning runs after all others in every hook,
in the order given (``best.ckpt`` first), so a resume point always holds the outcome of the validation
before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

from reidreg.errors import RunInterrupted
from reidreg.run_dir import BEST, LAST, atomic_writer, remove_temporaries

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


class BestCheckpoint(ModelCheckpoint):
    """``<dirpath>/best.ckpt``: the highest ``monitor`` value's checkpoint, chosen after every validation.

    Lightning's ``ModelCheckpoint`` would decide at the training epoch end when validation runs every epoch;
    here it decides at the end of the validation itself, so that a stop right after a validation (a signal
    during it) keeps that validation's best. Its state (best score and path) is saved in every resume point;
    restored from a run directory that was moved or copied, the stored paths are re-rooted to this
    ``dirpath`` (Lightning would keep only the old path and forget the best score).
    """

    def __init__(self, dirpath: str | Path, *, monitor: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=Path(BEST).stem,
            monitor=monitor,
            mode="max",
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath:
            state_dict = _rerooted(state_dict, Path(stored), Path(self.dirpath))
        super().load_state_dict(state_dict)


def _rerooted(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """``ModelCheckpoint`` state with every path under ``old`` moved under ``new``."""

    def moved(path: str) -> str:
        return str(new / Path(path).relative_to(old)) if path and Path(path).is_relative_to(old) else path

    state = dict(state, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}
    return state


class ResumePoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_steps`` steps (0: off), at epoch ends and on signals.

    A Lightning ``Checkpoint``: in every hook it runs after the other callbacks and after ``BestCheckpoint``
    (when listed after it), so what it saves includes their updates of that moment.
    """

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
        self._job_handlers: dict[signal.Signals, Any] = {}  # while listening: the handlers it replaced

    # ------------------------------------------------------------------ when to save
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if _last_batch_of_epoch(trainer):
            return  # saved (and stopped, if asked) at the epoch end, after the epoch's validation
        if self._stop_requested(trainer):
            self._save_and_stop(trainer)
        elif self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal during a validation within an epoch: stop once it is complete (a half-done validation
        # cannot be resumed). One at the epoch end is handled by on_train_epoch_end, which follows.
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and not _last_batch_of_epoch(trainer) and self._stop_requested(trainer, boundary=True):
            self._save_and_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
        if self._stop_requested(trainer, boundary=True):
            self._stop(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._listen()
        self.on_test_batch_end(trainer)  # a signal since the end of training

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # Nothing to save: training is complete and its last.ckpt written; the resumed run only tests.
        # Each rank stops on its own signal (test batches may differ between ranks: a collective could
        # hang); the ranks a launcher started die with the main process (reidreg.utils.ranks).
        if self._received is not None:
            self._stop(trainer, what="during the test (training is complete; the resumed run only tests)")

    def save(self, trainer: pl.Trainer) -> None:
        if not trainer.fast_dev_run:
            _save(trainer, self.path)

    # ------------------------------------------------------------------ signals
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and self.path.parent.is_dir():
            remove_temporaries(self.path.parent)

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Record the stop signals within this block: the whole run (fit, test and what lies between)."""
        self._job_handlers = {number: signal.getsignal(number) for number in self.signals}
        self._listen()
        try:
            yield
        finally:
            for number, handler in self._job_handlers.items():
                signal.signal(number, handler)
            self._job_handlers = {}

    def _listen(self) -> None:
        for number in self._job_handlers:
            signal.signal(number, self._record_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again over Lightning's SIGTERM handler (installed by fit and test once setup is done), which would
        # stop the run at the epoch end or in the middle of a validation, unsaved, and which broadcasts from
        # within the handler under DDP.
        self._listen()

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
        if trainer.global_step % MULTIPROCESS_SIGNAL_CHECK_EVERY and not boundary:
            return False
        flag = torch.tensor(float(self._received is not None), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        _save(trainer, self.path)
        self._stop(trainer)

    def _stop(self, trainer: pl.Trainer, what: str | None = None) -> None:
        received = self._received or signal.SIGTERM  # another rank's signal, under DDP
        step = f"at step {trainer.global_step} (epoch {trainer.current_epoch})"
        what = what or f"{step}; resume point saved to {self.path}"
        message = f"received {received.name} {what}; resume with ckpt_path={self.path}"
        job_handler = self._job_handlers.get(received)
        if callable(job_handler):
            log.warning(message)  # the job's handler may end the process here
            job_handler(received, None)  # e.g. submitit: requeues the job
        elif self.requeue and trainer.is_global_zero:
            _requeue_slurm_job()
        raise RunInterrupted(message)


def _last_batch_of_epoch(trainer: pl.Trainer) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


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
