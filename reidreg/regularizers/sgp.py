"""SGP — Stochastic Gradient Perturbation, *our reading* of Zhou et al., "Stochastic Gradient Perturbation:
An Implicit Regularizer for Person Re-Identification", IEEE TCSVT 2023 (only the abstract is public).

The abstract fixes an implicit regularizer, derived from adversarial training, that replaces AT's
directional perturbation by a non-directional stochastic perturbation of the gradients. Our reading
(docs, "SGP"), with probability ``p`` per step (one draw per step):

    g̃ = g + σ · rms(g) · ξ,    ξ ~ N(0, I),    rms(g) = sqrt(mean(g²)),

applied to the feature-map gradients at ``sites`` (outputs of ``block1`` … ``block5``,
``regional_block5``: a tensor hook armed by a forward hook, so everything upstream receives the
perturbed gradient) and/or, as a gradient transform, to the network's parameter gradients
(``param_grads``: after AMP unscaling and the DDP all-reduce). ``rms_over="sample"`` takes one RMS per
sample of a feature map. The noise is relative, so a GradScaler's scale s cancels exactly in the
feature hooks (s·g gets s·σ·rms(g)·ξ); RMS and noise are computed in float32.

Feature hooks act only in the task forward pass of a standard step (``StepContext.stage == "task"``):
an input transform's passes (an attack's) and a phase's (LinR's) keep exact gradients. Randomness
comes from generators seeded by (seed, global step): reproducible, resume-exact, the same on every DDP
rank; the on/off draw is on a CPU generator (no device sync). Parameter noise is one draw into a flat
buffer seen as one view per gradient (``FlatViews``), a fixed number of operators for any number of
tensors. Logs: ``active`` and ``noise_ratio/<site>`` (``params`` for parameter gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from reidreg.errors import ConfigError
from reidreg.options.rules import boolean, choice, integer, list_of, number
from reidreg.regularizers.base import LogDict, Regularizer, StepContext
from reidreg.regularizers.foreach import FlatViews, ParameterLookup
from reidreg.regularizers.random_streams import step_generator

if TYPE_CHECKING:
    from reidreg.models import ReIDModel

BACKBONE_SITES = ("block1", "block2", "block3", "block4", "block5")
SITES = (*BACKBONE_SITES, "regional_block5")
PARAMS_SITE = "params"


class SGP(Regularizer):
    """Add σ·rms(g)·ξ to gradients at feature-map ``sites`` and/or of the parameters, with probability p."""

    OPTION_RULES = {
        "sigma": number(ge=0),
        "p": number(ge=0, le=1),
        "sites": list_of(choice(*SITES)),
        "param_grads": boolean(),
        "rms_over": choice("tensor", "sample"),
        "seed": integer(),
    }

    def __init__(
        self,
        *,
        sigma: float = 1.0,
        p: float = 1.0,
        sites: Sequence[str] = ("block4",),
        param_grads: bool = False,
        rms_over: Literal["tensor", "sample"] = "tensor",
        seed: int = 0,
    ) -> None:
        super().__init__()
        sites = tuple(sites)
        if not sites and not param_grads:
            raise ConfigError("regularizer.sgp perturbs nothing: give sites and/or set param_grads=true")
        self.sigma, self.p, self.sites, self.param_grads = sigma, p, sites, param_grads
        self.rms_over, self.seed = rms_over, seed
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._step: StepContext | None = None  # the standard step being run; its stage arms the hooks
        self._generator: torch.Generator | None = None
        self._noise_ratios: dict[str, torch.Tensor] = {}
        self._network = ParameterLookup([])
        self._param_noise: FlatViews | None = None  # ξ of the parameter gradients, one view per gradient

    # ------------------------------------------------------------------ hooks of the interface
    def attach(self, module: Any) -> None:
        self.remove_hooks()
        self._network = ParameterLookup([name for name, _ in module.model.named_parameters()])
        for site in self.sites:
            stage = _site_module(module.model, site)
            self._handles.append(stage.register_forward_hook(functools.partial(self._arm_site, site)))

    def remove_hooks(self) -> None:
        """Detach from the network (the hooks of ``attach`` are removed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_step_start(self, ctx: StepContext) -> None:
        device = next(ctx.model.parameters()).device
        draws = step_generator(self.seed, ctx.global_step)  # on the CPU: reading the draw is no sync
        self._active = bool(torch.rand((), generator=draws) < self.p)
        on_cpu = device.type == "cpu"
        self._generator = draws if on_cpu else step_generator(self.seed, ctx.global_step, device)
        self._noise_ratios = {}
        self._step = ctx

    def transform_gradients(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> LogDict:
        if self._active and self.param_grads:
            self._perturb_parameter_grads(ctx.model, optimizer)
        logs: LogDict = {"active": float(self._active)}
        logs.update({f"noise_ratio/{site}": ratio for site, ratio in self._noise_ratios.items()})
        return logs

    # ------------------------------------------------------------------ the perturbation
    def _arm_site(self, site: str, stage: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook of a stage: perturb the gradient of its output in this step's backward."""
        in_task_pass = self._step is not None and self._step.stage == "task"
        if (
            self._active
            and in_task_pass
            and stage.training
            and output.requires_grad
            and torch.is_grad_enabled()
        ):
            output.register_hook(functools.partial(self._perturb_feature_grad, site))

    def _perturb_feature_grad(self, site: str, grad: torch.Tensor) -> torch.Tensor:
        reduce_dims = tuple(range(1, grad.dim())) if self.rms_over == "sample" else None
        perturbed, noise_sq, grad_sq = self._add_noise(grad, reduce_dims)
        self._noise_ratios[site] = _rms_ratio(noise_sq, grad_sq)
        return perturbed

    @torch.no_grad()
    def _perturb_parameter_grads(self, model: ReIDModel, optimizer: torch.optim.Optimizer) -> None:
        # Only the network's parameters: not the regularizers' own (e.g. adaptive L2's θ).
        network = {id(p) for p in self._network(model)}
        grads = [
            param.grad
            for group in optimizer.param_groups
            for param in group["params"]
            if param.grad is not None and id(param) in network
        ]
        if not grads:
            return
        if self._param_noise is None or not self._param_noise.matches(grads):
            self._param_noise = FlatViews([grad.shape for grad in grads], grads[0].device)
        noise = self._param_noise
        noise.flat.normal_(generator=self._generator)  # ξ of every gradient, in the optimizer's order
        norms = torch.stack(torch._foreach_norm(grads)).float()
        noise.scale_(norms * noise.numels.rsqrt() * self.sigma)  # σ·rms(gₙ)·ξₙ, rms(gₙ) = ‖gₙ‖/√numelₙ
        torch._foreach_add_(grads, noise.views)
        noise_sq = torch.linalg.vector_norm(noise.flat).square()
        self._noise_ratios[PARAMS_SITE] = _rms_ratio(noise_sq, norms.square().sum())

    def _add_noise(
        self, grad: torch.Tensor, reduce_dims: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g + σ·rms(g)·ξ in g's dtype (computed in float32), and the sums of squares of noise and g."""
        grad32 = grad.float()
        squares = grad32.pow(2)
        if reduce_dims is None:
            rms = squares.mean().sqrt()
        else:
            rms = squares.mean(dim=reduce_dims, keepdim=True).sqrt()
        xi = torch.randn(grad.shape, generator=self._generator, device=grad.device, dtype=torch.float32)
        noise = self.sigma * rms * xi
        return (grad32 + noise).to(grad.dtype), noise.pow(2).sum().detach(), squares.sum().detach()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, sigma={self.sigma}, p={self.p}, sites={list(self.sites)}, "
            f"param_grads={self.param_grads}, rms_over={self.rms_over}, seed={self.seed}"
        )


def _rms_ratio(noise_sq: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """rms(noise) / rms(g) from sums of squares over the same elements (0 where g is all zero)."""
    return (noise_sq / grad_sq.clamp_min(torch.finfo(grad_sq.dtype).tiny)).sqrt()


def _site_module(model: ReIDModel, site: str) -> nn.Module:
    """The network part whose output is the site ``site``."""
    if site == "regional_block5":
        if model.regional_block5 is None:
            raise ConfigError(
                "regularizer.sgp.sites has regional_block5 but the model has no regional branches"
            )
        return model.regional_block5
    return getattr(model.backbone, site)
