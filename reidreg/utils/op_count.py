"""Count the aten operators a piece of code dispatches: a deterministic CPU proxy for a GPU step's host work.

On a GPU a training step of this project is launch-bound: its time grows with the number of operators,
each a kernel launch (or at least a dispatch) of a few microseconds, more than with their sizes. Counting
them on the CPU, below autograd, covers the forward, the backward (run by the autograd engine on the
calling thread for CPU tensors, callbacks included) and the optimizer, and gives the same number on every
run, unlike a timer on a shared machine.

A ``torch._foreach_*`` operator counts once when CUDA would run it as one fused launch, that is when the
tensors at the same position of its lists have the same shape; otherwise CUDA falls back to one launch per
tensor (e.g. a list of 0-d tensors against full-size ones), and it counts once per tensor. Operators that
read a tensor's value back to the host (``item()``, ``bool()``, ``nonzero``, ...) are also counted
separately as ``host_reads``: on a GPU each is a device sync.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result on the host depends on tensor values: a device sync on a GPU.
HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::is_nonzero"})


def _tensor_lists(args: tuple[Any, ...]) -> list[list[torch.Tensor]]:
    return [
        list(arg)
        for arg in args
        if isinstance(arg, list | tuple) and arg and all(isinstance(t, torch.Tensor) for t in arg)
    ]


def launches(func: torch._ops.OpOverload, args: tuple[Any, ...]) -> int:
    """How many operators ``func(*args)`` counts as: one, or one per tensor for an unfused foreach."""
    if not func.__name__.startswith("_foreach_"):
        return 1
    lists = _tensor_lists(args)
    if len(lists) < 2:
        return 1
    first = lists[0]
    fused = all(
        len(other) == len(first) and all(a.shape == b.shape for a, b in zip(first, other, strict=True))
        for other in lists[1:]
    )
    return 1 if fused else len(first)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: ...``, then ``counter.total``, ``.by_name`` and ``.host_reads``."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.by_name[name] += launches(func, args)
        self.host_reads += name in HOST_READS
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


def count_step(run: Callable[[], Any], optimizer: torch.optim.Optimizer) -> tuple[OpCounter, OpCounter]:
    """Count the operators of ``run()`` (one training step), split into (everything but ``optimizer``'s
    ``step()``, that ``step()`` alone): the optimizer step is counted through its pre/post hooks."""
    inner = OpCounter()
    hooks = [
        optimizer.register_step_pre_hook(lambda *_: None if inner.__enter__() else None),
        optimizer.register_step_post_hook(lambda *_: inner.__exit__(None, None, None)),
    ]
    try:
        with OpCounter() as whole:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    outside = OpCounter()
    outside.by_name = whole.by_name - inner.by_name
    outside.host_reads = whole.host_reads - inner.host_reads
    return outside, inner
