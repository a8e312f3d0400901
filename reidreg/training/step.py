"""The training step, plain PyTorch: regularizers plugged in as input transforms, loss terms and gradient
transforms (``reidreg.regularizers.base``), in their configured order.

``ReIDModule.training_step`` runs it under Lightning; the op-count test and ``benchmarks/regularizer_ops.py``
run the same object by hand. One standard step:

1. ``on_step_start`` of every regularizer; input transforms (``ctx.stage = "inputs"``);
2. forward → one ``HeadOutput`` per objective module → task loss; loss terms added (``stage = "task"``);
3. ``zero_grad``, backward; gradient transforms act on the unscaled, all-reduced ``.grad``; optimizer step.

A regularizer whose ``owns_step`` is true runs ``phase_step`` instead, and no other regularizer acts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from reidreg.regularizers.base import Regularizer, StepContext, TrainStep


class TrainingStep:
    """The step of a run: its regularizers (plug-ins) in order and the code that calls them."""

    def __init__(self, regularizers: Iterable[Regularizer]) -> None:
        self.regularizers = list(regularizers)

    def loss(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Steps 1–2: the loss to back-propagate; its parts are logged into ``ctx.logs``."""
        for regularizer in self.regularizers:
            regularizer.on_step_start(ctx)
        ctx.stage = "inputs"
        for regularizer in self.regularizers:
            images, labels, logs = regularizer.transform_inputs(ctx, images, labels)
            ctx.log(regularizer, logs)
        ctx.stage = "task"
        outputs = ctx.model(images)
        task_losses = ctx.loss(outputs, labels)
        step = TrainStep(ctx, images, labels, outputs, task_losses)
        loss = task_losses["total"]
        for regularizer in self.regularizers:
            terms = regularizer.loss_terms(step)
            for term in terms.values():
                loss = loss + term
            ctx.log(regularizer, terms)
        ctx.logs["train/loss"] = loss.detach()
        ctx.logs.update({f"train/{k}": v.detach() for k, v in task_losses.items() if k != "total"})
        return loss

    def transform_gradients(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:
        """Step 3's gradient transforms; in a step owned by a phase, none act."""
        if ctx.stage != "task":
            return
        for regularizer in self.regularizers:
            ctx.log(regularizer, regularizer.transform_gradients(ctx, optimizer))

    def __call__(
        self,
        ctx: StepContext,
        images: torch.Tensor,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        optimizer_step: Callable[[], object] | None = None,
    ) -> torch.Tensor | None:
        """One step; returns the loss optimised (detached), or ``None`` after a phase's step.

        ``optimizer_step=None``: gradient transforms, then ``optimizer.step()`` (plain PyTorch). Otherwise a
        callable that steps and calls ``transform_gradients`` itself once gradients are unscaled (Lightning's
        optimizer step, which runs ``ReIDModule.on_before_optimizer_step``).
        """
        owner = next((r for r in self.regularizers if r.owns_step(ctx)), None)
        if owner is not None:
            ctx.stage = "phase"
            ctx.log(owner, owner.phase_step(ctx, images, labels))
            ctx.stage = "done"
            return None
        loss = self.loss(ctx, images, labels)
        optimizer.zero_grad(set_to_none=True)
        backward(loss)
        if optimizer_step is None:
            self.transform_gradients(ctx, optimizer)
            optimizer.step()
        else:
            optimizer_step()
        ctx.stage = "done"
        return loss.detach()
