"""Divergence guard: a run whose loss or gradients blow up stops at once instead of producing a "result".

Watched at every training step, on the device (no host synchronisation in the step):

* the optimised loss is non-finite (NaN/inf);
* the gradients are non-finite, read after AMP unscaling (not under ``16-mixed``, where an overflowing
  step is expected now and then: the GradScaler skips it and lowers its scale);
* the loss exceeds ``factor`` × its early level: the lowest loss of the first ``reference_steps`` steps
  (from the second step on, so that a run exploding at once is caught too; the lowest, because an
  exploding step inside the window must not raise the reference).

The accumulated verdict is read every ``check_every_n_steps`` steps, at every epoch end and before any
checkpoint is written, so no checkpoint (neither ``last`` nor ``best``) is taken from a diverged state. A
diverged run raises ``TrainingDiverged`` (one line: step, value, a hint), which the training run records as
``status: diverged`` in ``run.json``; no test metrics are written for it.

The module reports the loss it optimised in each step as ``last_step_loss`` (a 0-dim tensor).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from reidreg.errors import TrainingDiverged


class DivergenceGuard(pl.Callback):
    """Stops training with ``TrainingDiverged`` on a non-finite or exploding loss or non-finite gradients."""

    def __init__(
        self,
        *,
        factor: float = 10.0,
        reference_steps: int = 5,
        check_every_n_steps: int = 20,
        check_gradients: bool = True,
        lr_hint: str = "optim.optimizer.lr",
    ) -> None:
        self.factor, self.reference_steps = factor, reference_steps
        self.check_every_n_steps, self.check_gradients, self.lr_hint = (
            check_every_n_steps,
            check_gradients,
            lr_hint,
        )
        self.reference: torch.Tensor | None = None  # early loss level (0-dim, on the device; checkpointed)
        self.steps_seen = 0
        self._bad: torch.Tensor | None = None  # 0-dim bool: something went wrong since the last check
        self._first_bad: dict[str, torch.Tensor] = {}  # step, loss and reason code of the first bad step
        self._unscaled_gradients = True

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # 16-bit AMP scales gradients and overflows by design now and then; its GradScaler handles that.
        self._unscaled_gradients = not str(trainer.precision).startswith("16")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not (self.check_gradients and self._unscaled_gradients):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
            self._flag(~finite, step=trainer.global_step, reason=GRADIENT)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        loss = getattr(pl_module, "last_step_loss", None)
        if loss is None:
            return
        loss, step = loss.detach().float(), trainer.global_step - 1  # the step that has just been taken
        finite = loss.isfinite()
        self._flag(~finite, step=step, reason=NON_FINITE, loss=loss)
        if self.reference is None:
            self.reference = torch.where(finite, loss, torch.inf)
        else:
            self._flag(loss > self.factor * self.reference, step=step, reason=EXPLODED, loss=loss)
            if self.steps_seen < self.reference_steps:
                self.reference = torch.where(finite, torch.minimum(self.reference, loss), self.reference)
        self.steps_seen += 1
        if trainer.global_step % self.check_every_n_steps == 0:
            self.raise_if_diverged(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raise_if_diverged(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # Runs while the checkpoint is assembled, before anything is written: a diverged state is never saved.
        self.raise_if_diverged(trainer)

    def state_dict(self) -> dict[str, Any]:
        reference = None if self.reference is None else float(self.reference)
        return {"reference": reference, "steps_seen": self.steps_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_seen = state_dict["steps_seen"]
        reference = state_dict["reference"]
        self.reference = None if reference is None else torch.tensor(reference)

    # ------------------------------------------------------------------ verdict
    def _flag(self, bad: torch.Tensor, *, step: int, reason: int, loss: torch.Tensor | None = None) -> None:
        """Accumulate ``bad`` on the device, remembering the first bad step's details.

        Python numbers enter ``torch.where`` as scalars: no host-to-device copy, hence no synchronisation.
        """
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.bool, device=bad.device)
            self._first_bad = {
                "step": torch.zeros((), dtype=torch.long, device=bad.device),
                "loss": torch.full((), float("nan"), device=bad.device),
                "reference": torch.full((), float("nan"), device=bad.device),
                "reason": torch.zeros((), dtype=torch.long, device=bad.device),
            }
        first = bad & ~self._bad
        self._first_bad["step"] = torch.where(first, step, self._first_bad["step"])
        self._first_bad["reason"] = torch.where(first, reason, self._first_bad["reason"])
        if loss is not None:
            self._first_bad["loss"] = torch.where(first, loss.to(bad.device), self._first_bad["loss"])
        if self.reference is not None:
            reference = self.reference.to(bad.device)
            self._first_bad["reference"] = torch.where(first, reference, self._first_bad["reference"])
        self._bad = self._bad | bad

    def raise_if_diverged(self, trainer: pl.Trainer) -> None:
        """Read the verdict (one host synchronisation) and stop the run if it diverged, on every rank."""
        if self._bad is None:
            return
        bad = self._bad.float()
        if trainer.world_size > 1:  # the ranks' losses differ: stop all of them if one diverged
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bool(bad):
            return
        step, reason = int(self._first_bad["step"]), int(self._first_bad["reason"])
        loss, reference = float(self._first_bad["loss"]), float(self._first_bad["reference"])
        what = {
            NON_FINITE: f"the loss is {loss}",
            GRADIENT: "the gradients are not finite",
            EXPLODED: (
                f"the loss {loss:.4g} is over divergence.factor={self.factor:g} times its early level "
                f"{reference:.4g}"
            ),
        }[reason]
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        hint = f"lower {self.lr_hint}" + (f" (lr at that point: {lr:.3g})" if lr is not None else "")
        raise TrainingDiverged(
            f"training diverged at step {step} (epoch {trainer.current_epoch}): {what}; {hint}, or check the "
            "data and the regularizer settings"
        )


NON_FINITE, GRADIENT, EXPLODED = 1, 2, 3
