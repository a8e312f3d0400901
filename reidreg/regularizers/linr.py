"""LinR — Linear Regularization refinement, a phase of its own ("Linear Regularization: An easy approach to
refine your model", CVPR 2021 submission, Sec. 3, Algorithm 1).

``rounds`` × (``cls_steps`` classification steps, then ``linr_steps`` steps of the LinR loss), each phase
with its own SGD; the LinR loss asks the network to be linear in its input (eqs. 4–7)::

    a ~ Beta(α, α), b = 1 − a;  P1 = softmax f(a·x + b·y);  P2 = a·softmax f(x) + b·softmax f(y) (detached)
    L_LinR = KL(P1 ‖ P2), averaged over the pairs of the batch, summed over objective modules

with the variants ``linrc`` (eq. 9), ``linrnl`` (no classification phase) and ``linrnm`` (eq. 10). While
LinR owns the step (``owns_step``: from ``start_epoch``, or from step 0 after ``init_from``), no other
regularizer acts: no input transform, loss term or gradient transform (coupled and decoupled L2 alike).
Round, phase and random draws are functions of the refinement steps done (``steps_done``, checkpointed):
a resumed run continues exactly. Equations, choices where the paper is silent (pairs, ``bn_mode``,
``cls_loss``) and the start rules: docs/methods/linr.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reidreg.errors import ConfigError
from reidreg.options.rules import boolean, choice, integer, mapping, number, optional, string
from reidreg.regularizers.base import LogDict, Regularizer, StepContext, TrainingPlan
from reidreg.run_dir import network_weights, read_checkpoint

log = logging.getLogger(__name__)

VARIANTS = ("linr", "linrc", "linrnl", "linrnm")
CLS_LOSSES = ("task", "ce", "ce_plain")
BN_MODES = ("train", "eval")
CLASSIFICATION_PHASE, LINR_PHASE = 0, 1
OptimizerFactory = Callable[..., torch.optim.Optimizer]


def random_partner(batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Index of the image each image is mixed with: a random single-cycle permutation (no fixed point)."""
    if batch_size < 2:
        raise ValueError(f"LinR mixes two different images: batch size must be >= 2, got {batch_size}")
    order = torch.from_numpy(rng.permutation(batch_size))
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)  # order[i] is mixed with order[i + 1], the last with the first
    return partner


def _log(weight: float) -> float:
    return math.log(weight) if weight > 0 else -math.inf


def mixed_pair_kl(
    mixed_logits: torch.Tensor,
    logits_x: torch.Tensor,
    logits_y: torch.Tensor,
    a: float,
    *,
    confident_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair KL(P1 ‖ P2) of eqs. 4–7 (P2 detached) and the summed classes (all / eq. 9).

    ``mixed_logits = f(a·x + b·y)``, ``logits_x = f(x)``, ``logits_y = f(y)``, all (B, NC). Computed in log
    space: log P2 = logaddexp(log a + log softmax f(x), log b + log softmax f(y)) (b = 0: log b = −inf).
    """
    log_p1 = F.log_softmax(mixed_logits.float(), dim=1)
    log_p2 = torch.logaddexp(
        _log(a) + F.log_softmax(logits_x.detach().float(), dim=1),
        _log(1.0 - a) + F.log_softmax(logits_y.detach().float(), dim=1),
    )
    num_classes = mixed_logits.shape[1]
    keep = log_p2.exp() > 1.0 / num_classes if confident_only else torch.ones_like(log_p1, dtype=torch.bool)
    terms = log_p1.exp() * (log_p1 - log_p2)
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(dim=1), keep


def scaled_input_kl(scaled_logits: torch.Tensor, logits_x: torch.Tensor, a: float) -> torch.Tensor:
    """Per-image KL(softmax f(a·x) ‖ a·softmax f(x)) of eq. 10, literally (the second argument detached)."""
    log_p1 = F.log_softmax(scaled_logits.float(), dim=1)
    log_target = math.log(a) + F.log_softmax(logits_x.detach().float(), dim=1)
    return (log_p1.exp() * (log_p1 - log_target)).sum(dim=1)


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside: every BatchNorm layer of ``model`` in eval mode (normalises with its running statistics,
    which it neither updates nor counts); afterwards the layers that were training train again."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for layer in layers:
        layer.train(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.train(True)


def _mirror_loaded_step_count(module: LinR, incompatible_keys: Any) -> None:
    """After ``load_state_dict`` (resume): the python step counter from the loaded buffer (one read)."""
    module.step_count = int(module.steps_done)


class LinR(Regularizer):
    """Refinement by alternating classification and LinR phases (Algorithm 1); see the module docstring."""

    OPTION_RULES = {
        "rounds": integer(min=1),
        "cls_steps": integer(min=0),
        "linr_steps": integer(min=1),
        "alpha": number(gt=0),
        "variant": choice(*VARIANTS),
        "cls_loss": choice(*CLS_LOSSES),
        "bn_mode": choice(*BN_MODES),
        "cls_optimizer": optional(mapping()),
        "linr_optimizer": optional(mapping()),
        "init_from": optional(string()),
        "start_epoch": optional(integer(min=0)),
        "allow_untrained": boolean(),
        "seed": integer(),
    }

    def __init__(
        self,
        *,
        rounds: int = 3,
        cls_steps: int = 200,
        linr_steps: int = 200,
        alpha: float = 0.75,
        variant: str = "linr",
        cls_loss: str = "task",
        bn_mode: str = "train",
        cls_optimizer: OptimizerFactory | None = None,
        linr_optimizer: OptimizerFactory | None = None,
        init_from: str | None = None,
        start_epoch: int | None = None,
        allow_untrained: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if init_from is not None and start_epoch is not None:
            raise ConfigError(
                "regularizer.linr: set init_from (refine a checkpoint) or start_epoch (refine within this "
                f"run), not both (got init_from={init_from!r}, start_epoch={start_epoch})"
            )
        self.rounds, self.linr_steps, self.alpha = rounds, linr_steps, alpha
        self.cls_steps = 0 if variant == "linrnl" else cls_steps  # LinRNL: no classification phase
        self.variant, self.cls_loss, self.bn_mode = variant, cls_loss, bn_mode
        self.init_from, self.start_epoch, self.seed = init_from, start_epoch, seed
        self.allow_untrained = allow_untrained
        # The paper's Sec. 4.2 values when built from Python without a config.
        self.cls_optimizer_factory = cls_optimizer or functools.partial(
            torch.optim.SGD, lr=3e-4, momentum=0.9, weight_decay=5e-4
        )
        self.linr_optimizer_factory = linr_optimizer or functools.partial(
            torch.optim.SGD, lr=1e-2, momentum=0.9, weight_decay=0.0
        )
        # [classification, LinR], created by extra_optimizers (Lightning then checkpoints them).
        self.phase_optimizers: list[torch.optim.Optimizer] = []
        # LinR steps done so far (both phases): a python int read every step (no device synchronisation),
        # mirrored in a buffer so that checkpoints save it; loading one sets the int back (exact resume).
        self.step_count = 0
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_post_hook(_mirror_loaded_step_count)

    # ------------------------------------------------------------------ schedule
    @property
    def total_steps(self) -> int:
        return self.rounds * (self.cls_steps + self.linr_steps)

    def phase_of(self, step: int) -> tuple[int, int]:
        """(round t, phase) of the ``step``-th refinement step (0-based), Algorithm 1 lines 3–6."""
        round_index, within = divmod(step, self.cls_steps + self.linr_steps)
        return round_index, CLASSIFICATION_PHASE if within < self.cls_steps else LINR_PHASE

    @property
    def refine_from_epoch(self) -> int:
        return self.start_epoch or 0

    def owns_step(self, ctx: StepContext) -> bool:
        """From ``start_epoch`` on, every step is a refinement step (no other regularizer acts in it)."""
        return ctx.epoch >= self.refine_from_epoch

    # ------------------------------------------------------------------ hooks
    def check(self, plan: TrainingPlan) -> None:
        """Refuse, before any work, a refinement that cannot run as configured (see the module docstring)."""
        self.check_backbone_not_frozen(plan.freeze_backbone_epochs)
        if self.init_from is None and not self.start_epoch and not self.allow_untrained:
            network = (
                "an ImageNet backbone with randomly initialised heads"
                if plan.pretrained_backbone
                else "a randomly initialised network"
            )
            raise ConfigError(
                f"regularizer.linr would refine the network as built ({network}) from the first step: "
                f"init_from=null, start_epoch={self.start_epoch}. LinR refines a trained model (the "
                "LinR paper's Sec. 4.8, 'sweet point'): set "
                "regularizer.linr.init_from=<run>/checkpoints/best.ckpt, or "
                "regularizer.linr.start_epoch=E to train normally for E epochs first, or "
                "regularizer.linr.allow_untrained=true to refine it anyway"
            )
        available = max(plan.max_epochs - self.refine_from_epoch, 0) * plan.steps_per_epoch
        if self.total_steps > available:
            no_cls = " (cls_steps counts 0: variant=linrnl has no classification phase)"
            needed_epochs = self.refine_from_epoch + math.ceil(
                self.total_steps / max(plan.steps_per_epoch, 1)
            )
            raise ConfigError(
                f"regularizer.linr needs rounds·(cls_steps + linr_steps) = {self.rounds}·({self.cls_steps} + "
                f"{self.linr_steps}) = {self.total_steps} steps{no_cls if self.variant == 'linrnl' else ''}, "
                f"but only {available} fit between the start of refinement (epoch {self.refine_from_epoch}) "
                f"and trainer.max_epochs={plan.max_epochs} at data.steps_per_epoch={plan.steps_per_epoch}; "
                f"raise trainer.max_epochs to at least {needed_epochs}, or lower "
                "regularizer.linr.rounds/cls_steps/linr_steps"
            )

    def check_backbone_not_frozen(self, freeze_backbone_epochs: int) -> None:
        if self.refine_from_epoch < freeze_backbone_epochs:
            raise ConfigError(
                f"regularizer.linr refines the whole network from epoch {self.refine_from_epoch}, but "
                f"freeze_backbone_epochs={freeze_backbone_epochs} freezes the backbone until then; "
                "set freeze_backbone_epochs=0 (refining a checkpoint) or a later regularizer.linr.start_epoch"
            )

    def attach(self, module: Any) -> None:
        self.check_backbone_not_frozen(module.freeze_backbone_epochs)
        if self.init_from is not None:
            self.load_network(module, Path(self.init_from))

    def load_network(self, module: Any, path: Path) -> None:
        """Load the network weights (``state_dict`` entries ``model.*``) of a reidreg Lightning checkpoint."""
        weights = network_weights(read_checkpoint(path, option="regularizer.linr.init_from"))
        try:
            module.model.load_state_dict(weights)
        except RuntimeError as error:
            raise ConfigError(
                f"regularizer.linr.init_from={path}: its network does not match this config's "
                f"(backbone, branches, number of identities): {error}"
            ) from error
        log.info("LinR: network weights loaded from %s", path)

    def extra_optimizers(self, module: Any) -> list[torch.optim.Optimizer]:
        self.phase_optimizers = [
            factory(params=module.model.parameters())
            for factory in (self.cls_optimizer_factory, self.linr_optimizer_factory)
        ]
        return self.phase_optimizers

    def phase_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> LogDict:
        step = self.step_count
        if step >= self.total_steps:
            return {}  # refinement done: keep the weights (only reached if the Trainer cannot stop yet)
        round_index, phase = self.phase_of(step)
        if phase == CLASSIFICATION_PHASE:
            loss, logs = self.classification_loss(ctx, images, labels)
        else:
            # a and the pairs are a function of (seed, step): a resumed run draws the same ones.
            rng = np.random.default_rng([self.seed, step])
            loss, logs = self.linr_loss(ctx.model, images, rng)
        ctx.optimize(loss, self.phase_optimizers[phase])
        self.step_count = step + 1
        self.steps_done.fill_(self.step_count)
        if step + 1 == self.total_steps:
            ctx.stop()  # Algorithm 1 line 8: return the refined θ
        return {"phase": float(phase), "round": float(round_index), **logs}

    def on_train_end(self, module: Any) -> None:
        # ``check`` made the rounds fit in the epochs; something else stopped the run (max_steps, max_time,
        # a divergence stop) or it started before that check.
        if self.step_count < self.total_steps:
            log.warning(
                "LinR stopped after %d of %d steps (%d rounds of %d + %d): the run ended before refinement",
                self.step_count,
                self.total_steps,
                self.rounds,
                self.cls_steps,
                self.linr_steps,
            )

    # ------------------------------------------------------------------ losses
    def classification_loss(
        self, module: Any, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, LogDict]:
        """Algorithm 1 line 5: the ReID task loss (``task``), its label-smoothed CE terms (``ce``), or eq. 8's
        plain cross-entropy ``H(p, q) = −Σ_c p_c log q_c``, p one-hot (``ce_plain``), summed over modules.

        Logged: ``ce`` = the label-smoothed CE summed over modules (whatever the loss), ``cls_loss``.
        """
        outputs = module.model(images)
        terms = module.loss(outputs, labels)
        ce = sum(terms[f"{head}/ce"] for head in outputs)
        if self.cls_loss == "task":
            loss = terms["total"]
        elif self.cls_loss == "ce":
            loss = ce
        else:
            loss = sum(F.cross_entropy(out.logits.float(), labels) for out in outputs.values())
        return loss, {"ce": ce.detach(), "cls_loss": loss.detach()}

    def linr_loss(
        self, model: nn.Module, images: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, LogDict]:
        """Algorithm 1 line 6: L_LinR (eqs. 4–7), LinRC (eq. 9) or LinRNM (eq. 10), summed over modules;
        both forward passes with BatchNorm as ``bn_mode`` says."""
        a = float(rng.beta(self.alpha, self.alpha))
        with frozen_batchnorm(model) if self.bn_mode == "eval" else contextlib.nullcontext():
            with torch.no_grad():  # P2 is a stop-gradient target
                logits_x = {head: out.logits for head, out in model(images).items()}
            if self.variant == "linrnm":
                scaled = model(a * images)
                kl = sum(scaled_input_kl(scaled[head].logits, logits_x[head], a).mean() for head in logits_x)
                return kl, {"kl": kl.detach(), "a": a}

            # non_blocking: a host-to-device copy that does not wait for the device's queued work.
            partner = random_partner(images.shape[0], rng).to(images.device, non_blocking=True)
            mixed = model(a * images + (1.0 - a) * images[partner])
        confident_only = self.variant == "linrc"
        kl, kept_shares = 0.0, []
        for head, head_logits in logits_x.items():
            per_pair, keep = mixed_pair_kl(
                mixed[head].logits, head_logits, head_logits[partner], a, confident_only=confident_only
            )
            kl = kl + per_pair.mean()
            kept_shares.append(keep.float().mean())
        logs: LogDict = {"kl": kl.detach(), "a": a}
        if self.variant == "linrc":
            logs["kept_class_share"] = torch.stack(kept_shares).mean()
        return kl, logs

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, variant={self.variant}, rounds={self.rounds}, cls_steps={self.cls_steps}, "
            f"linr_steps={self.linr_steps}, alpha={self.alpha}, cls_loss={self.cls_loss}, "
            f"bn_mode={self.bn_mode}, init_from={self.init_from}, start_epoch={self.start_epoch}, "
            f"allow_untrained={self.allow_untrained}"
        )
