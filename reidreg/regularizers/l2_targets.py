"""Which tensors the L2 regularizers penalise, and their squared norms (AdaptiveReID, ICPR 2020, eqs. 2–4).

The paper's Sec. III-C regularises every distinct parameter wₙ of the network (eq. 2), and Sec. IV-E groups
them into categories by layer type: conv_kernel, conv_bias, bn_gamma, bn_beta, dense_kernel (+ dense_bias,
which the paper's network does not have). Here the category follows the module that owns the tensor:
``nn.Conv2d`` weight/bias, BatchNorm (any ``_BatchNorm``, so also ``SyncBatchNorm`` under DDP) weight (γ)
/bias (β), ``nn.Linear`` weight/bias. ``categories`` restricts the coverage (e.g. leave out BN).

Regularizers keep only the *names* found at ``attach`` and look the tensors up in the network at each use
(``foreach.ParameterLookup``): they must not hold network modules, and a SyncBatchNorm conversion replaces
the BN modules (same names, new tensors) after ``attach``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

L2_CATEGORIES = ("conv_kernel", "conv_bias", "bn_gamma", "bn_beta", "dense_kernel", "dense_bias")

# (module type, parameter attribute) -> category; the first matching module type wins.
_CATEGORY_OF = (
    (nn.Conv2d, {"weight": "conv_kernel", "bias": "conv_bias"}),
    (_BatchNorm, {"weight": "bn_gamma", "bias": "bn_beta"}),
    (nn.Linear, {"weight": "dense_kernel", "bias": "dense_bias"}),
)


class L2Target(NamedTuple):
    """One regularised tensor wₙ: its full parameter name in the network, the tensor, its category."""

    name: str
    parameter: nn.Parameter
    category: str


def _category(module: nn.Module, attribute: str) -> str | None:
    for module_type, categories in _CATEGORY_OF:
        if isinstance(module, module_type):
            return categories.get(attribute)
    return None


def l2_targets(model: nn.Module, categories: Sequence[str] | None = None) -> list[L2Target]:
    """The regularised tensors of ``model`` in ``named_modules`` order, restricted to ``categories``.

    ``categories=None`` means all of ``L2_CATEGORIES``. Parameters of other module types are not
    regularised; a warning names them, so that a new layer type is never left out silently.
    """
    selected = set(L2_CATEGORIES if categories is None else categories)
    unknown = selected - set(L2_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown L2 categories {sorted(unknown)}; choose from {list(L2_CATEGORIES)}")
    targets, uncovered, seen = [], [], set()
    for module_name, module in model.named_modules():
        for attribute, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # a tensor shared by two modules is penalised once
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{attribute}" if module_name else attribute
            category = _category(module, attribute)
            if category is None:
                uncovered.append(name)
            elif category in selected:
                targets.append(L2Target(name, parameter, category))
    if uncovered:
        warnings.warn(
            f"L2 regularizers do not cover these parameters (no conv/BN/linear category): {uncovered}",
            stacklevel=2,
        )
    return targets


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖wₙ‖² (sum of squares of all elements, AdaptiveReID footnote 1) of every tensor, as one 1-D tensor.

    Values only, no autograd graph: the L2 penalties write their gradients themselves (``constant_l2``,
    ``adaptive_l2``). One fused ``_foreach_norm`` and two operators, for any number of tensors.
    """
    with torch.no_grad():
        return torch.stack(torch._foreach_norm(list(tensors))).square()
