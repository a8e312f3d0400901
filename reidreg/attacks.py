"""L∞ sign-gradient attacks (FGSM, PGD) on normalised images, bounded in the pixel space of the image.

One implementation serves adversarial training (``reidreg.regularizers.adversarial``: maximise the task
loss of a training batch) and the robustness evaluation (``reidreg.evaluation.robustness``: push a query's
embedding away from its clean embedding).

The network sees normalised images x = (u − mean) / std, where u is the pixel image in [0, 1]. The budget
is defined on u, as in the attack literature: ‖u_adv − u‖∞ ≤ ε and u_adv ∈ [0, 1] (ε = 8/255 is 8 grey
levels). The attack optimises the pixel perturbation δ = u_adv − u and returns x + δ / std, which equals
(u + δ − mean) / std and is *exactly* x when δ = 0 (no lossy round trip through ``denormalize``).

PGD (Madry et al., ICLR 2018, eq. 2, in the δ form):

    δ₀ = 0, or δ₀ ~ U(−ε, ε) with ``random_start``;   δ_{t+1} = Π(δ_t + α · sign(∇_δ J(x + δ_t / std)))

for t = 0 … T−1, where Π clamps every pixel to [−ε, ε] ∩ [−u, 1 − u] (the ε-ball and the valid pixel
range). FGSM (Goodfellow et al., ICLR 2015, eq. 3) is the single step T = 1, α = ε from δ₀ = 0; with a
random start (Wong et al., ICLR 2020, "FGSM-RS") the default step is α = 1.25 ε. A random start is
*required* when J has a zero gradient at δ = 0, e.g. a distance to the clean embedding (robustness
evaluation): the sign of a zero gradient is 0 and the attack would not move.

Pixels that are already outside [0, 1] (random-erasing noise in a training batch) may stay where they are:
the range for such a pixel is widened to include its own value, so δ = 0 is always allowed and
|δ| ≤ ε always holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from reidreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reidreg.errors import ConfigError

ATTACK_NAMES = ("fgsm", "pgd")

# Sign steps do not depend on the scale of the objective. Scaling it keeps small input gradients from
# flushing to zero in a float16 autocast backward (what GradScaler does for training); exact in float32.
OBJECTIVE_SCALE = 1024.0
# Without an explicit step size: FGSM-RS's 1.25 ε, and PGD steps that can travel 2.5 ε in total (the
# default of Engstrom et al.'s `robustness` library), enough to cross the ball from any start.
FGSM_RANDOM_START_STEP = 1.25
PGD_TOTAL_TRAVEL = 2.5
PGD_DEFAULT_STEPS = 7  # Madry et al.'s CIFAR-10 training attack


@dataclass(frozen=True)
class LinfAttack:
    """T steps of size ``step_size`` inside the pixel-space ε-ball (module docstring); FGSM is T = 1."""

    eps: float
    step_size: float
    steps: int
    random_start: bool = False
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.eps < 0 or self.step_size < 0:
            raise ConfigError(f"attack eps and step_size must be >= 0, got {self.eps} and {self.step_size}")
        if self.steps < 1:
            raise ConfigError(f"attack steps must be >= 1, got {self.steps}")

    def perturb(
        self,
        objective: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised N×C×H×W ``images`` moved to (approximately) maximise the scalar ``objective``.

        ``objective`` maps normalised images to the scalar to maximise. ``mask`` (N booleans) restricts the
        attack to some samples; the others come back unchanged (they still take part in the objective,
        e.g. in BatchNorm statistics or triplets). The random start draws from ``generator`` (on the
        images' device). Only ∂objective/∂δ is computed (``torch.autograd.grad``): the ``.grad`` of the
        model's parameters is never touched. The returned tensor is detached.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("an attack needs autograd: run it outside torch.inference_mode()")
        images = images.detach()
        mean, std = _per_channel(self.mean, images), _per_channel(self.std, images)
        pixels = images * std + mean
        # Bounds of δ per pixel: the ε-ball ∩ the pixel range (widened to contain out-of-range pixels).
        low = (-pixels).clamp(min=-self.eps, max=0.0)
        high = (1.0 - pixels).clamp(min=0.0, max=self.eps)
        if mask is not None:
            keep = ~mask.to(device=images.device, dtype=torch.bool).view(-1, 1, 1, 1)
            low, high = low.masked_fill(keep, 0.0), high.masked_fill(keep, 0.0)

        delta = torch.zeros_like(images)
        if self.random_start:
            uniform = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            delta = torch.minimum(torch.maximum((2 * uniform - 1) * self.eps, low), high)
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                value = objective(images + delta / std)
                (gradient,) = torch.autograd.grad(value * OBJECTIVE_SCALE, delta)
                # NaN (0·inf in an overflowing half-precision backward) gives no direction: stay put.
                step = self.step_size * torch.nan_to_num(gradient, nan=0.0).sign()
                delta = torch.minimum(torch.maximum(delta.detach() + step, low), high)
        return (images + delta / std).detach()


def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel constants as a 1×C×1×1 tensor with the dtype and device of ``like``."""
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def build_attack(
    name: str,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int | None = None,
    random_start: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> LinfAttack:
    """The attack ``name`` ("fgsm" or "pgd"); ``None`` step size / steps take the attack's default.

    FGSM: one step of ε (1.25 ε with a random start). PGD: ``PGD_DEFAULT_STEPS`` steps of 2.5 ε / steps.
    """
    if name == "fgsm":
        if steps not in (None, 1):
            raise ConfigError(f"fgsm is a single step: set steps to 1 or null (got {steps}), or use pgd")
        steps = 1
        if step_size is None:
            step_size = FGSM_RANDOM_START_STEP * eps if random_start else eps
    elif name == "pgd":
        steps = PGD_DEFAULT_STEPS if steps is None else int(steps)
        if step_size is None:
            step_size = PGD_TOTAL_TRAVEL * eps / max(steps, 1)
    else:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    return LinfAttack(
        eps=float(eps),
        step_size=float(step_size),
        steps=steps,
        random_start=bool(random_start),
        mean=tuple(mean),
        std=tuple(std),
    )
