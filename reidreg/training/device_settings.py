"""Device settings in one place: what a run does differently on a CUDA GPU to train fast.

``resolve_device_settings`` turns the trainer options (accelerator, precision, deterministic) and
``model.compile`` into a ``DeviceSettings``; the rest of this module applies it. On a CPU nothing
changes: fp32, contiguous tensors, no pinned memory, plain Adam.

On a CUDA GPU:

* ``trainer.precision=auto`` → ``bf16-mixed`` where the GPU supports bf16 (Ampere and later), else
  ``32``; an explicit precision always wins. bf16 needs no loss scaling, so gradients are never seen
  scaled by the regularizers.
* ``torch.backends.cudnn.benchmark`` (through the Trainer's ``benchmark`` argument) unless
  ``trainer.deterministic``: the inputs have one fixed size, so cuDNN's search pays off after a few steps.
* channels-last memory format for the network (and the batch augmentation produces channels-last
  batches): the layout tensor cores convolve in, without transposes around every convolution.
* pinned host memory in the training DataLoader; Lightning already copies batches to the GPU with
  ``non_blocking=True``, which overlaps the copy with compute only from pinned memory.
* fused Adam/AdamW (one kernel for all parameters) — not under a GradScaler (``16-mixed``): Lightning
  then leaves unscaling to the fused step, after ``on_before_optimizer_step``, where regularizers act on
  gradients that must be unscaled (``Regularizer.transform_gradients``).
* ``model.compile=true`` (off by default): ``torch.compile`` of the network's forward as one graph (see
  ``compile_network``; refused with forward hooks on the network, i.e. SGP's feature-map sites).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reidreg.errors import ConfigError

#: Precisions that train with a GradScaler in Lightning (fp16 autocast): the fused optimizer is not used.
GRAD_SCALER_PRECISIONS = ("16-mixed", "16")


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers (detected, or given in tests)."""

    cuda: bool
    bf16: bool

    @classmethod
    def detect(cls) -> Capabilities:
        cuda = torch.cuda.is_available()
        # including_emulation=False: pre-Ampere GPUs "support" bf16 only by slow emulation.
        return cls(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def runs_on_cuda(accelerator: str, capabilities: Capabilities) -> bool:
    """Whether Lightning will train on a CUDA GPU with this ``trainer.accelerator``."""
    accelerator = str(accelerator).lower()
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and capabilities.cuda)


def resolve_precision(precision: str | int, *, accelerator: str, capabilities: Capabilities) -> str | int:
    """``auto`` → ``bf16-mixed`` on a CUDA GPU that supports bf16, ``32`` elsewhere; others unchanged."""
    if str(precision) != "auto":
        return precision
    return "bf16-mixed" if runs_on_cuda(accelerator, capabilities) and capabilities.bf16 else "32"


@dataclass(frozen=True)
class DeviceSettings:
    """The resolved settings of one run (see the module docstring for each)."""

    cuda: bool
    precision: str | int
    cudnn_benchmark: bool
    channels_last: bool
    pin_memory: bool
    fused_adam: bool
    compile: bool

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments for ``pl.Trainer`` (they replace ``trainer.precision`` and set ``benchmark``)."""
        return {"precision": self.precision, "benchmark": self.cudnn_benchmark}


def resolve_device_settings(
    *,
    accelerator: str = "auto",
    precision: str | int = "auto",
    deterministic: bool = False,
    compile: bool = False,
    capabilities: Capabilities | None = None,
) -> DeviceSettings:
    """Settings from ``trainer.accelerator``, ``trainer.precision``, ``trainer.deterministic`` and
    ``model.compile``; ``capabilities`` defaults to this machine's."""
    capabilities = capabilities or Capabilities.detect()
    if str(accelerator).lower() in ("gpu", "cuda") and not capabilities.cuda:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible; "
            "use trainer.accelerator=auto or cpu"
        )
    cuda = runs_on_cuda(accelerator, capabilities)
    resolved = resolve_precision(precision, accelerator=accelerator, capabilities=capabilities)
    return DeviceSettings(
        cuda=cuda,
        precision=resolved,
        cudnn_benchmark=cuda and not deterministic,
        channels_last=cuda,
        pin_memory=cuda,
        fused_adam=cuda and str(resolved) not in GRAD_SCALER_PRECISIONS,
        compile=bool(compile),
    )


def prepare_network(model: nn.Module, settings: DeviceSettings) -> nn.Module:
    """Channels-last parameters on CUDA and, with ``compile``, ``compile_network``; returns ``model``.

    Call it once the network and the regularizers are built (``attach`` registers hooks) and before the
    optimizers are: the parameters
    stay the same ``nn.Parameter`` objects (only their memory layout changes), so hooks and regularizers
    that hold them are unaffected, and checkpoints hold the same values."""
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if settings.compile:
        compile_network(model)
    return model


def to_channels_last(images: torch.Tensor, settings: DeviceSettings) -> torch.Tensor:
    """A 4-d image batch in channels-last layout on CUDA (a no-op if it already is, or on the CPU)."""
    if settings.channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def compile_network(model: nn.Module, **compile_options: Any) -> None:
    """``torch.compile`` the network's ``forward`` as one graph (``model.compile=true``).

    The instance's ``forward`` is replaced (not its ``__call__``), so every way the module runs the
    network goes through the compiled graph: ``model(images)``, ``embed``/``extract_features`` (eval mode,
    no grad, flipped images), LinR's no-grad and mixed forwards, an attack's input gradients. Dynamo
    recompiles once per mode (train/eval, grad/no-grad, frozen backbone); parameter names, and thus
    checkpoints, are unchanged.

    Not with forward hooks on the network (SGP's ``sites``): a hook that registers a gradient hook on an
    intermediate tensor breaks the graph and its per-step on/off state becomes a recompilation guard, so
    this is refused rather than left to silently run slower or differently.
    """
    hooked = [name or "model" for name, module in model.named_modules() if module._forward_hooks]
    if hooked:
        raise ConfigError(
            f"model.compile=true does not support forward hooks on the network (found on {hooked}, e.g. "
            "regularizer.sgp.sites); set model.compile=false or use SGP with sites=[] param_grads=true"
        )
    model.forward = torch.compile(model.forward, **compile_options)


def with_fused_adam(
    optimizer_factory: Callable[..., torch.optim.Optimizer], settings: DeviceSettings
) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer factory (Hydra's ``_partial_``) with ``fused=True`` if it builds Adam/AdamW and the
    settings allow it; any other optimizer, or one with an explicit ``fused``/``foreach``, is unchanged."""
    if not settings.fused_adam:
        return optimizer_factory
    target = optimizer_factory.func if isinstance(optimizer_factory, functools.partial) else optimizer_factory
    keywords = optimizer_factory.keywords if isinstance(optimizer_factory, functools.partial) else {}
    is_adam = isinstance(target, type) and issubclass(target, (torch.optim.Adam, torch.optim.AdamW))
    if not is_adam or "fused" in keywords or "foreach" in keywords:
        return optimizer_factory
    return functools.partial(optimizer_factory, fused=True)
