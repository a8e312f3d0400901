"""The regularizer interface: every regularizer is one ``Regularizer`` subclass in its own file.

A regularizer plugs into the public training step (``reidreg.training.step.TrainingStep``), which calls
the regularizers in their configured order. Each hook's default does nothing; a method overrides the hooks
of the kinds it is (one, or several):

===============================  ===========================================================================
hook                             kind: when / what for
===============================  ===========================================================================
``transform_inputs``             input transform: before the forward pass, replace the images and labels
                                 (adversarial examples). The labels returned must be what the task loss
                                 takes: integer identities (N,), as ``ReIDLoss``'s CE and triplet need; a
                                 method with soft targets (mixup) keeps them and adds its own loss term.
``loss_terms(step)``             loss term: tensors *added* to the task loss, from the batch's outputs (SGSL).
``transform_gradients``          gradient transform: act on ``p.grad`` after backward, AMP unscaling and the
                                 DDP all-reduce, right before ``optimizer.step()`` (L2 penalties, SGP's
                                 parameter noise, decoupled weight decay). Not part of the differentiable
                                 loss: ``torch.autograd.grad`` of the loss never sees them.
``on_step_start``                every standard step, before anything else (a per-step draw: SGP).
``owns_step`` / ``phase_step``   a procedure that is not a standard step (LinR's refinement rounds): while
                                 ``owns_step`` is true, ``phase_step`` replaces the whole step and *no other
                                 regularizer acts*: no input transform, loss term or gradient transform.
===============================  ===========================================================================

Hooks get a ``StepContext`` (network, task loss, step counters, log sink), not the LightningModule.
Values to log are returned as ``dict[str, float | Tensor]`` (or given to ``ctx.log``) and logged as
``reg/<name>/<key>``. Once per run: ``check(plan)`` refuses, before any work, a run this regularizer
cannot carry out; ``attach(module)`` (an object with ``.model``) creates own parameters or network hooks;
``extra_optimizers`` and ``on_train_end`` serve phases and final reports. Own parameters are ordinary
``nn.Parameter`` s (optimised with the network, checkpointed); those set only by a gradient transform are
listed by ``ddp_ignored_parameters`` so that DDP neither waits for nor averages them.

Options are checked before any work by ``OPTION_RULES`` (``reidreg.options.rules``, by option name).
A new regularizer is a file here and a YAML under ``conf/regularizer/`` with its ``_target_``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from reidreg.metric_keys import regularizer_key
from reidreg.models import HeadOutput

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reidreg.options.rules import Rule

LogDict = dict[str, float | torch.Tensor]


@dataclass(frozen=True)
class TrainingPlan:
    """What a run is about to do, known before any work starts; handed to ``Regularizer.check``."""

    max_epochs: int
    steps_per_epoch: int  # training batches (optimizer steps) per epoch
    freeze_backbone_epochs: int
    pretrained_backbone: bool  # ImageNet weights loaded into the backbone (False: random init)
    resuming: bool  # continuing from a checkpoint (``ckpt_path``)


@dataclass
class StepContext:
    """One training step as the hooks see it. ``stage`` says where the step is: ``inputs`` while input
    transforms run (an attack's own passes), ``task`` from the task forward pass to the optimizer step,
    ``phase`` in a step owned by ``phase_step``, ``done`` after the optimizer step."""

    model: nn.Module
    loss: Callable[..., dict[str, torch.Tensor]]  # the task loss: (outputs, labels) → named terms, "total"
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    stage: str = "task"
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)  # this step's values, by key
    # For phases: take one optimizer step on a loss (AMP, DDP, hooks included), and end training.
    optimize: Callable[[torch.Tensor, torch.optim.Optimizer], None] | None = None
    stop: Callable[[], None] | None = None

    def log(self, regularizer: Regularizer, values: LogDict) -> None:
        """Keep ``values`` (detached) as ``reg/<name>/<key>`` for this step's log line."""
        for key, value in values.items():
            graph = isinstance(value, torch.Tensor) and value.requires_grad
            self.logs[regularizer_key(regularizer.name, key)] = value.detach() if graph else value


@dataclass
class TrainStep:
    """What the standard step has computed by the time of ``Regularizer.loss_terms``."""

    context: StepContext
    images: torch.Tensor
    labels: torch.Tensor
    outputs: dict[str, HeadOutput]  # one per objective module: embedding, bn_feature, logits
    task_losses: dict[str, torch.Tensor]  # "<head>/ce", "<head>/triplet", "total"

    @property
    def model(self) -> nn.Module:
        return self.context.model


class Regularizer(nn.Module):
    """Base class: a named, optional piece of training. Subclasses document the equation they implement."""

    #: Option name → rule, checked by ``reidreg.options`` before any work.
    OPTION_RULES: ClassVar[dict[str, Rule]] = {}

    #: True for explicit L2 penalties: the optimizer's own weight decay must then be 0 (no double count).
    replaces_weight_decay: bool = False

    #: Set by ``build_regularizers`` to the key of its config (``regularizer.<name>``); prefixes its logs.
    name: str = "regularizer"

    def check(self, plan: TrainingPlan) -> None:
        """Raise ``ConfigError`` (naming the option) if this run cannot work as configured."""

    def attach(self, module: Any) -> None:
        """Called once before training with the Lightning module (the network is ``module.model``)."""

    def ddp_ignored_parameters(self) -> list[str]:
        """Names of own parameters that DDP must ignore: their gradients are set after the all-reduce."""
        return []

    def on_step_start(self, ctx: StepContext) -> None:
        """Called at the start of every standard step."""

    def transform_inputs(
        self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LogDict]:
        """Images and labels to train on in this step (default: unchanged), and values to log."""
        return images, labels, {}

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        """Terms *added* to the loss, by name (each is logged); may be empty."""
        return {}

    def transform_gradients(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> LogDict:
        """Act on ``p.grad`` (unscaled, all-reduced) before ``optimizer.step()``; return values to log."""
        return {}

    def owns_step(self, ctx: StepContext) -> bool:
        """Whether ``phase_step`` replaces the standard step this time (no other regularizer acts then)."""
        return False

    def phase_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> LogDict:
        """One step of this regularizer's own procedure (``ctx.optimize``, ``ctx.stop``); values to log."""
        raise NotImplementedError(f"{type(self).__name__} owns a step but has no phase_step")

    def extra_optimizers(self, module: Any) -> list[torch.optim.Optimizer]:
        """Optimizers this regularizer steps itself in ``phase_step`` (saved in checkpoints)."""
        return []

    def on_train_end(self, module: Any) -> None:
        """Write final reports (``save_figure``) once training has finished."""

    def save_figure(self, module: Any, figure: Figure, filename: str) -> Path:
        """Save a figure as ``<run_dir>/plots/<filename>`` and send it to W&B when logging there."""
        import matplotlib.pyplot as plt

        path = Path(module.run_dir) / "plots" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        module.log_image(f"reg/{self.name}/{Path(filename).stem}", path)
        return path

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
