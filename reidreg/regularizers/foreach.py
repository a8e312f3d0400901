"""Helpers for regularizers that act on every tensor of the network at a per-step cost independent of their
number.

On a GPU a training step of this network is launch-bound: every aten operator costs a few microseconds
of host time, whatever its size. A regularizer that spends a few operators on each of the ~200 tensors of
a ResNet-50 adds about as much host time as the forward pass; with these helpers it spends a few
``torch._foreach_*`` operators on all of them. On CUDA such an operator is one fused launch only if the
tensors at the same position of its lists share shape, dtype and device; a 0-d scalar per tensor falls
back to one launch per tensor, which ``FlatViews`` avoids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ParameterLookup:
    """The current tensors of a network for a fixed list of parameter names, in that order.

    Each name's path is followed through the modules' own registries (``_modules``, ``_parameters``), so a
    module replaced after the names were taken (SyncBatchNorm conversion) is seen, at ~1 µs per name:
    ``named_parameters()`` walks every module of a ResNet-50 through nested generators (~3 ms per step on
    a slow CPU; ``get_parameter`` per name is slower still).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._paths = [(tuple(name.split(".")[:-1]), name.rsplit(".", 1)[-1]) for name in self.names]

    def __call__(self, model: nn.Module) -> list[nn.Parameter]:
        parameters = []
        for modules, attribute in self._paths:
            owner = model
            for part in modules:
                owner = owner._modules[part]
            parameters.append(owner._parameters[attribute])
        return parameters


def add_to_grads(tensors: Sequence[torch.Tensor], updates: Sequence[torch.Tensor]) -> None:
    """``t.grad += u`` for every pair, in one foreach operator; a tensor without a gradient gets ``u``.

    ``updates`` become gradients as they are: fresh tensors laid out like ``tensors``, not views of a buffer
    that is written again later.
    """
    pairs = list(zip(tensors, updates, strict=True))
    present = [(tensor.grad, update) for tensor, update in pairs if tensor.grad is not None]
    if present:
        grads, additions = zip(*present, strict=True)
        torch._foreach_add_(list(grads), list(additions))
    for tensor, update in pairs:
        if tensor.grad is None:
            tensor.grad = update


def add_scaled_to_grads(tensors: Sequence[torch.Tensor], factor: float) -> None:
    """``t.grad += factor·t`` for every tensor, in one foreach operator; a tensor without a gradient gets
    ``factor·t``."""
    present = [t for t in tensors if t.grad is not None]
    if present:
        torch._foreach_add_([t.grad for t in present], present, alpha=factor)
    missing = [t for t in tensors if t.grad is None]
    for tensor, product in zip(missing, torch._foreach_mul(missing, factor) if missing else [], strict=True):
        tensor.grad = product


def add_products_to_grads(tensors: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]) -> None:
    """``t.grad += t·f`` for every pair, ``f`` shaped like ``t``, in one foreach operator (read ``t.grad``,
    ``t`` and ``f`` once, write ``t.grad`` once); a tensor without a gradient gets ``t·f``."""
    pairs = list(zip(tensors, factors, strict=True))
    present = [(tensor.grad, tensor, factor) for tensor, factor in pairs if tensor.grad is not None]
    if present:
        grads, present_tensors, present_factors = zip(*present, strict=True)
        torch._foreach_addcmul_(list(grads), list(present_tensors), list(present_factors))
    missing = [(tensor, factor) for tensor, factor in pairs if tensor.grad is None]
    if missing:
        missing_tensors, missing_factors = zip(*missing, strict=True)
        products = torch._foreach_mul(list(missing_tensors), list(missing_factors))
        for tensor, product in zip(missing_tensors, products, strict=True):
            tensor.grad = product


class FlatViews:
    """One flat buffer of ``dtype`` on ``device``, seen as one view per shape (the views are made once).

    Every view is a whole number of rows of ``gcd`` of the sizes (64 for a ResNet), so that a per-row index
    tells which view a row belongs to: ``spread`` writes ``values[n]`` into every element of view n and
    ``scale_`` multiplies view n by ``values[n]`` in three operators, for any number of views.
    ``values`` is a 1-D tensor on ``device`` with one entry per view.
    """

    def __init__(
        self, shapes: Sequence[torch.Size], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> None:
        self.shapes = [torch.Size(shape) for shape in shapes]
        self.device = torch.device(device)
        sizes = [shape.numel() for shape in self.shapes]
        row = math.gcd(*sizes) or 1
        self.flat = torch.empty(sum(sizes), device=self.device, dtype=dtype)
        chunks = self.flat.split(sizes)
        self.views = [chunk.view(shape) for chunk, shape in zip(chunks, self.shapes, strict=True)]
        self.numels = torch.tensor(sizes, dtype=torch.float32).to(self.device)
        rows_per_view = torch.tensor([size // row for size in sizes])
        self._row_owner = torch.repeat_interleave(torch.arange(len(sizes)), rows_per_view).to(self.device)
        self._rows = self.flat.view(-1, row)

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the views have the shapes of ``tensors``, on their device."""
        return len(tensors) == len(self.shapes) and all(
            tensor.shape == shape and tensor.device == self.device
            for tensor, shape in zip(tensors, self.shapes, strict=True)
        )

    def spread(self, values: torch.Tensor) -> None:
        """Every element of view n := ``values[n]``."""
        self._rows.copy_(values.index_select(0, self._row_owner).unsqueeze(1))

    def scale_(self, values: torch.Tensor) -> None:
        """View n *= ``values[n]``."""
        self._rows.mul_(values.index_select(0, self._row_owner).unsqueeze(1))
