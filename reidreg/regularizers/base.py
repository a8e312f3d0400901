"""The regularizer interface: every regularizer is one ``Regularizer`` subclass in its own file.

A regularizer plugs into the training step of ``reidreg.training.ReIDModule`` through a few optional
hooks; each default does nothing, so a regularizer overrides only what its method needs:

==========================  ==============================================================================
hook                        when / what for
==========================  ==============================================================================
``check(plan)``             once, before any work: refuse (``ConfigError``) a run this regularizer cannot
                            carry out as configured (LinR: its rounds do not fit in the epochs).
``attach(module)``          once, before training: create own parameters (adaptive L2's θ), register
                            forward/backward hooks on the network (SGP), load a checkpoint (LinR).
``on_train_batch_start``    every step, before anything else (draw a per-step decision, e.g. SGP's p).
``prepare_inputs``          may replace the batch's images before the forward pass (adversarial training).
``loss_terms(step)``        extra loss terms, added to the task loss: from the parameters (L2 penalties)
                            or from the batch's features, logits and labels (SGSL). Each term is logged.
``on_before_optimizer_step`` act on gradients after backward and after AMP unscaling (SGP, decoupled
                            weight decay).
``training_step``           take over a whole step (LinR's refinement phases); ``None`` = standard step.
``extra_optimizers``        optimizers of the regularizer's own (LinR's two phases); checkpointed.
``on_train_end``            final reports (plots) into the run directory and the loggers.
==========================  ==============================================================================

Own trainable parameters are ordinary ``nn.Parameter`` s of the regularizer: the module registers every
regularizer as a submodule, so they are optimised with the network (same optimizer and schedule) and saved
in, and restored from, checkpoints. Values to log are returned as ``dict[str, float | Tensor]`` and
logged by the module under ``reg/<name>/<key>``.

A new regularizer needs a file here and a YAML under ``conf/regularizer/`` with its ``_target_``;
nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reidreg.models import HeadOutput, ReIDModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reidreg.training.module import ReIDModule

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
class TrainStep:
    """Everything one standard training step has computed, handed to ``Regularizer.loss_terms``."""

    model: ReIDModel
    images: torch.Tensor
    labels: torch.Tensor
    outputs: dict[str, HeadOutput]  # one per objective module: embedding, bn_feature, logits
    task_losses: dict[str, torch.Tensor]  # "<head>/ce", "<head>/triplet", "total"
    global_step: int
    epoch: int


class Regularizer(nn.Module):
    """Base class: a named, optional piece of training. Subclasses document the equation they implement."""

    #: True for explicit L2 penalties: the optimizer's own weight decay must then be 0 (no double count).
    replaces_weight_decay: bool = False

    #: Set by ``build_regularizers`` to the key of its config (``regularizer.<name>``); prefixes its logs.
    name: str = "regularizer"

    def check(self, plan: TrainingPlan) -> None:
        """Raise ``ConfigError`` (naming the option) if this run cannot work as configured."""

    def attach(self, module: ReIDModule) -> None:
        """Called once with the Lightning module before training starts (the network is ``module.model``)."""

    def on_train_batch_start(self, module: ReIDModule, batch_idx: int) -> None:
        """Called at the start of every training step."""

    def prepare_inputs(
        self, module: ReIDModule, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, LogDict]:
        """Images to train on in this step (default: unchanged) and values to log."""
        return images, {}

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        """Terms *added* to the loss, by name (each is logged); may be empty."""
        return {}

    def on_before_optimizer_step(self, module: ReIDModule, optimizer: torch.optim.Optimizer) -> LogDict:
        """Act on ``p.grad`` after backward (and after AMP unscaling), before ``optimizer.step()``."""
        return {}

    def training_step(self, module: ReIDModule, batch: Any, batch_idx: int) -> LogDict | None:
        """Run the whole step instead of the standard one and return values to log; ``None`` = don't."""
        return None

    def extra_optimizers(self, module: ReIDModule) -> list[torch.optim.Optimizer]:
        """Optimizers this regularizer steps itself in ``training_step`` (saved in checkpoints)."""
        return []

    def on_train_end(self, module: ReIDModule) -> None:
        """Write final reports (``save_figure``) once training has finished."""

    def save_figure(self, module: ReIDModule, figure: Figure, filename: str) -> Path:
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
