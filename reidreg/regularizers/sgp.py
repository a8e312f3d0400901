"""SGP — Stochastic Gradient Perturbation (Zhou et al., IEEE TCSVT 2023; paper 002), *our reading*.

Only the paper's abstract is public: no method text, no equation, no code. What the abstract fixes: SGP is
an *implicit* regularizer (no extra data; one forward and one backward per step), derived from adversarial
training by observing that adversarial data augmentation acts through the gradients, and it replaces AT's
*directional* adversarial perturbation by a *non-directional stochastic* perturbation of the gradients.
Everything below is our documented reading (METHODS.md §6), not the authors' formula:

    g̃ = g + σ · rms(g) · ξ,    ξ ~ N(0, I),    rms(g) = sqrt(mean(g²)),

applied, with probability ``p`` per training step (one draw per step), to

* feature-map gradients at chosen ``sites`` — the outputs of backbone stages ``block1`` … ``block5``
  (``block5`` is the global branch's block 5) and ``regional_block5`` (the regional branches' copy): a
  forward hook registers a tensor hook on the stage's output, so everything *upstream* of the site
  (earlier layers and their parameters) receives the perturbed gradient, as an input perturbation at
  that depth would cause; and/or
* parameter gradients of the network (``param_grads``), just before the optimizer step.

The noise is relative: σ is the noise-to-signal RMS ratio. ``rms_over="tensor"`` (default, the formula as
written) takes one RMS per gradient tensor; ``"sample"`` takes one per sample of a feature map (rows of
the batch dimension), so samples with small gradients get proportionally small noise. Parameter
gradients always use the tensor's RMS.

Mixed precision. Parameter gradients are perturbed in ``on_before_optimizer_step``, which Lightning runs
after AMP unscaling, so they are never seen scaled. The feature-map hooks run inside the backward pass,
where 16-bit AMP gradients are still multiplied by the GradScaler's scale s. This is correct as is,
because the noise is relative: for the scaled gradient s·g the hook adds σ·rms(s·g)·ξ = s·σ·rms(g)·ξ,
so g̃_scaled = s·(g + σ·rms(g)·ξ) = s·g̃, and unscaling yields exactly the perturbation of the unscaled
gradient — whatever s is this step. RMS and noise are computed in float32 (no overflow of g² in float16)
and the sum is cast back to the gradient's dtype. If the scaled gradient overflowed, its RMS is inf, the
result is non-finite and the GradScaler skips the step and lowers s, as for any overflow.

Randomness comes from generators seeded by (seed, global step) (``random_streams``): runs are
reproducible, a resumed run draws what the uninterrupted one drew, and all DDP ranks draw the same numbers
(parameter-gradient noise is added after the all-reduce, so the replicas stay identical). The step's
on/off draw is made on a CPU generator, so that reading it is no device sync; the noise continues that
stream when the gradients are on the CPU, and comes from a generator of the same (seed, step) on their
device otherwise. Gradients of an attack's own forward/backward (adversarial training combined with SGP)
are left exact. Hooks act only in training mode with autograd on, and only in steps whose draw is on.

Cost (issue 10): parameter-gradient noise takes a fixed number of operators whatever the number of
tensors. ξ of all of them is one draw into a flat float32 buffer seen as one view per gradient
(``FlatViews``, kept while the gradients keep their shapes), in the optimizer's order; each view is
scaled by σ·rms(gₙ) = σ·‖gₙ‖/√numelₙ, the norms from one fused ``_foreach_norm``, and added with one
``_foreach_add_`` (in the gradient's dtype). On the CPU, one draw of N numbers equals consecutive draws of
the tensors' sizes whenever each size is a multiple of 16, as for every tensor of a ResNet: torch's CPU
normal sampler transforms its uniform numbers 16 at a time.

Logs: ``active`` (0/1) every step and, when active, ``noise_ratio/<site>`` = rms(noise) / rms(g) of the
step's application at each site (``params`` for parameter gradients: over all of them together).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from reidreg.attacks import attack_in_progress
from reidreg.errors import ConfigError
from reidreg.regularizers.base import LogDict, Regularizer
from reidreg.regularizers.foreach import FlatViews, ParameterLookup
from reidreg.regularizers.random_streams import step_generator

if TYPE_CHECKING:
    from reidreg.models import ReIDModel
    from reidreg.training.module import ReIDModule

BACKBONE_SITES = ("block1", "block2", "block3", "block4", "block5")
SITES = (*BACKBONE_SITES, "regional_block5")
PARAMS_SITE = "params"


class SGP(Regularizer):
    """Add σ·rms(g)·ξ to gradients at feature-map ``sites`` and/or of the parameters, with probability p."""

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
        if sigma < 0:
            raise ConfigError(f"regularizer.sgp.sigma must be >= 0, got {sigma}")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"regularizer.sgp.p must be in [0, 1], got {p}")
        unknown = sorted(set(sites) - set(SITES))
        if unknown:
            raise ConfigError(f"regularizer.sgp.sites: unknown {unknown}; choose from {list(SITES)}")
        if not sites and not param_grads:
            raise ConfigError("regularizer.sgp perturbs nothing: give sites and/or set param_grads=true")
        if rms_over not in ("tensor", "sample"):
            raise ConfigError(f"regularizer.sgp.rms_over must be 'tensor' or 'sample', got {rms_over!r}")
        self.sigma, self.p, self.sites, self.param_grads = sigma, p, sites, param_grads
        self.rms_over, self.seed = rms_over, seed
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._generator: torch.Generator | None = None
        self._noise_ratios: dict[str, torch.Tensor] = {}
        self._network = ParameterLookup([])
        self._param_noise: FlatViews | None = None  # ξ of the parameter gradients, one view per gradient

    # ------------------------------------------------------------------ hooks of the interface
    def attach(self, module: ReIDModule) -> None:
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

    def on_train_batch_start(self, module: ReIDModule, batch_idx: int) -> None:
        device = next(module.model.parameters()).device
        draws = step_generator(self.seed, module.global_step)  # on the CPU: reading the draw is no sync
        self._active = bool(torch.rand((), generator=draws) < self.p)
        on_cpu = device.type == "cpu"
        self._generator = draws if on_cpu else step_generator(self.seed, module.global_step, device)
        self._noise_ratios = {}

    def on_before_optimizer_step(self, module: ReIDModule, optimizer: torch.optim.Optimizer) -> LogDict:
        if self._active and self.param_grads:
            self._perturb_parameter_grads(module.model, optimizer)
        logs: LogDict = {"active": float(self._active)}
        logs.update({f"noise_ratio/{site}": ratio for site, ratio in self._noise_ratios.items()})
        return logs

    # ------------------------------------------------------------------ the perturbation
    def _arm_site(self, site: str, stage: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook of a stage: perturb the gradient of its output in this step's backward."""
        if (
            self._active
            and stage.training
            and torch.is_grad_enabled()
            and output.requires_grad
            and not attack_in_progress()
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
