"""Adaptive L2 regularization, AdaptiveReID (paper 000 §III-C, eqs. 4–8; analysis §IV-E, Figs. 3–4).

Every regularised tensor wₙ gets its own factor λₙ = A·f(θₙ) (eq. 7) with a trainable scalar θₙ and the
hard sigmoid of eq. 5 with c = 2.5:

    f(x) = 0 if x < −c,   1 if x > c,   x/(2c) + 0.5 otherwise

(TF2's 0.2x + 0.5; PyTorch's ``hardsigmoid`` uses c = 3, so it is written out here). The loss gets
Σₙ λₙ ‖wₙ‖² (eq. 8). The θₙ are scalar ``nn.Parameter`` s of the regularizer (``theta[n]``), so the main
optimizer trains them with the network (same Adam and lr schedule) and checkpoints save and restore them.

What to expect (METHODS §3): ∂L/∂θₙ = A/(2c)·‖wₙ‖² ≥ 0 inside (−c, c), so Adam moves every θₙ down by
about lr per step and λ decays over training (paper Fig. 3) until θₙ < −c, where λₙ = 0 and θₙ stops.
This is recorded as it is, not corrected.

Frozen tensors (``requires_grad=False``, e.g. the backbone in the head-only phase of the official recipe)
are left out of the sum by default (``include_frozen=False``, our choice): eq. 2 regularises the
*trainable* parameters, and a frozen wₙ in the loss would only push its θₙ down (by ~lr per step, ~0.8
over the recipe's 4,000 frozen steps at lr 2e-4) without regularising anything. ``include_frozen=True``
keeps them in the sum.

Gradient path, a few operators for any number of tensors (issue 10): the penalty is an autograd
``Function`` of the θₙ and wₙ whose backward returns no gradient to autograd (so no per-tensor
``AccumulateGrad`` work, no per-tensor θ arithmetic) and instead, at the end of the backward pass
(``foreach.after_backward``), adds to the ``.grad`` of every θₙ and every trainable wₙ, in a few foreach
operators, what autograd would accumulate there, g being the gradient that reached the penalty (1, or the
GradScaler's scale under 16-bit AMP, read as a device tensor):

    ∂/∂θₙ = g·A·f'(θₙ)·‖wₙ‖²,  f'(θ) = 1/(2c) on [−c, c] (eq. 5's linear piece, ±c included), 0 outside;
    ∂/∂wₙ = g·2λₙwₙ.

The θ gradients come from one vector (the views of its ``unbind``); the wₙ gradients from one foreach
``addcmul`` of the wₙ with views of a flat buffer holding 2gλₙ in every element of view n (``FlatViews``,
one float per weight), since a 0-d λₙ per tensor would cost one CUDA launch per tensor. Exactness: the
same terms, in fp32, added before AMP unscaling (which divides them by the scale like every other gradient
and checks them for inf/NaN); under DDP after the all-reduce, where every rank adds the same terms
(functions of the replicated weights and θ) to the averaged task gradient — the average of the per-rank
sums autograd would give. The θₙ still take part in the autograd graph (their ``AccumulateGrad`` runs with
no gradient), so DDP without ``find_unused_parameters`` waits for them and then leaves their ``.grad`` to
the penalty. Use ``.backward()`` on the loss: ``torch.autograd.grad`` would not see the penalty's gradient.

The categories are the paper's (§IV-E): conv_kernel, conv_bias, bn_gamma, bn_beta, dense_kernel (plus
dense_bias if a network has one). Our timm ResNet convolutions have no bias, so conv_bias holds only the
biases of the regional branches' 3×3 convs (the paper's Keras ResNet has biases in every conv), and the
bias-free classifiers give no dense_bias.

Reports: the median λ per category is logged as ``reg/<name>/lambda_median/<category>`` and kept in a
small history (``lambda_history``, saved in checkpoints through ``get_extra_state``, so it survives a
resume). It is taken at the steps where Lightning writes step metrics to the loggers when
``log_every_n_steps`` equals ``trainer.log_every_n_steps`` (global steps n−1, 2n−1, ...), plus the
initial step 0 and the last step. At the end of training: ``plots/lambda_median.png`` (Fig. 3),
``plots/lambda_histogram.png`` (Fig. 4: final λ in five equal buckets over [0, A·f(θ_init)] = [0, 0.0025]
by default) and ``<run_dir>/<name>_lambdas.csv`` (name, category, θ, λ of every tensor).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from reidreg.regularizers.base import LogDict, Regularizer, TrainStep
from reidreg.regularizers.foreach import (
    FlatViews,
    ParameterLookup,
    add_products_to_grads,
    add_to_grads,
    after_backward,
)
from reidreg.regularizers.l2_targets import L2_CATEGORIES, l2_targets, squared_norms

if TYPE_CHECKING:
    from reidreg.training.module import ReIDModule

HISTOGRAM_BUCKETS = 5


def hard_sigmoid(x: torch.Tensor, c: float = 2.5) -> torch.Tensor:
    """Eq. 5, case by case: x = ±c is on the linear piece ("otherwise"), so its gradient there is 1/(2c)."""
    return torch.where(x < -c, 0.0, torch.where(x > c, 1.0, x / (2 * c) + 0.5))


class AdaptiveL2(Regularizer):
    """Σₙ A·f(θₙ) ‖wₙ‖² with one trainable θₙ per regularised tensor (eq. 8)."""

    replaces_weight_decay = True

    def __init__(
        self,
        *,
        amplitude: float = 0.005,
        c: float = 2.5,
        theta_init: float = 0.0,
        categories: Sequence[str] | None = None,
        log_every_n_steps: int = 20,
        include_frozen: bool = False,
    ) -> None:
        super().__init__()
        if amplitude <= 0 or c <= 0 or log_every_n_steps < 1:
            raise ValueError(
                f"AdaptiveL2 needs amplitude > 0, c > 0, log_every_n_steps >= 1; got {amplitude}, {c}, "
                f"{log_every_n_steps}"
            )
        self.amplitude, self.c, self.theta_init = float(amplitude), float(c), float(theta_init)
        self.categories = None if categories is None else list(categories)
        self.log_every_n_steps, self.include_frozen = log_every_n_steps, include_frozen
        self.target_names: list[str] = []
        self.target_categories: list[str] = []
        # [{"step": global step, "<category>": median λ, ...}, ...] — plain data, saved via get_extra_state.
        self.lambda_history: list[dict[str, float]] = []
        self._lookup = ParameterLookup([])
        self._lambda_views: FlatViews | None = None  # 2gλₙ spread over the wₙ, see _AdaptiveL2Penalty

    # ------------------------------------------------------------------ the method
    def attach(self, module: ReIDModule) -> None:
        targets = l2_targets(module.model, self.categories)
        if not targets:
            raise ValueError(f"AdaptiveL2 found no tensor to regularise for categories={self.categories}")
        self.target_names = [target.name for target in targets]
        self.target_categories = [target.category for target in targets]
        self._lookup = ParameterLookup(self.target_names)
        device = targets[0].parameter.device
        # One scalar nn.Parameter per tensor (not one vector): Adam then keeps a separate state, step count
        # included, for every θₙ, as for separate variables in the official code; with a shared vector, a θₙ
        # whose tensor was frozen for a while would restart with a bias correction meant for a late step.
        self.theta = nn.ParameterList(
            nn.Parameter(torch.tensor(self.theta_init, device=device)) for _ in self.target_names
        )

    def theta_vector(self) -> torch.Tensor:
        """All θₙ as one 1-D tensor (differentiable), in the order of ``target_names``."""
        return torch.stack(list(self.theta))

    def lambdas(self) -> torch.Tensor:
        """λₙ = A·f(θₙ) (eq. 7), one per regularised tensor, differentiable in θ."""
        return self.amplitude * hard_sigmoid(self.theta_vector(), self.c)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Σₙ λₙ ‖wₙ‖² (eq. 8); ``.backward()`` adds its gradients in θ and in the weights.

        See ``include_frozen`` for frozen tensors.
        """
        parameters, thetas = self._lookup(model), list(self.theta)
        if not self.include_frozen:
            # A frozen wₙ and its θₙ stay out of the sum: θₙ gets no gradient, so Adam leaves it and its
            # state untouched, exactly as it does the frozen weight.
            kept = [index for index, parameter in enumerate(parameters) if parameter.requires_grad]
            if not kept:
                return thetas[0].new_zeros(())
            if len(kept) < len(parameters):
                parameters, thetas = [parameters[i] for i in kept], [thetas[i] for i in kept]
        return _AdaptiveL2Penalty.apply(self, len(thetas), *thetas, *parameters)

    def _spread_buffer(self, parameters: Sequence[torch.Tensor]) -> FlatViews:
        """A flat buffer with one view per tensor of ``parameters``, kept while they keep their shapes."""
        if self._lambda_views is None or not self._lambda_views.matches(parameters):
            self._lambda_views = FlatViews([p.shape for p in parameters], parameters[0].device)
        return self._lambda_views

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        return {"penalty": self.penalty(step.model)}

    # ------------------------------------------------------------------ reports
    def present_categories(self) -> list[str]:
        """The categories that have tensors, in the paper's order."""
        return [category for category in L2_CATEGORIES if category in self.target_categories]

    def initial_lambda(self) -> float:
        """A·f(θ_init): every λ starts here and, since Adam only lowers θ, stays at or below it."""
        return self.amplitude * float(hard_sigmoid(torch.tensor(self.theta_init), self.c))

    def lambda_medians(self) -> dict[str, float]:
        """Median λ per category present (paper Fig. 3)."""
        lambdas = self.lambdas().detach().cpu().numpy()
        categories = np.asarray(self.target_categories)
        return {
            category: float(np.median(lambdas[categories == category]))
            for category in self.present_categories()
        }

    def _record(self, step: int) -> dict[str, float]:
        medians = self.lambda_medians()
        self.lambda_history.append({"step": step, **medians})
        return medians

    def on_before_optimizer_step(self, module: ReIDModule, optimizer: torch.optim.Optimizer) -> LogDict:
        # global_step = number of optimizer steps already taken = updates θ has received so far.
        step = module.global_step
        # Lightning writes step metrics when (global_step + 1) % trainer.log_every_n_steps == 0.
        log = (step + 1) % self.log_every_n_steps == 0
        if not log and step != 0:
            return {}
        medians = self._record(step)  # step 0 too: λ = A·f(θ_init) before any update, where Fig. 3 starts
        return {f"lambda_median/{category}": value for category, value in medians.items()} if log else {}

    def on_train_end(self, module: ReIDModule) -> None:
        if not self.lambda_history or self.lambda_history[-1]["step"] != module.global_step:
            self._record(module.global_step)
        self.save_figure(module, self.median_figure(), "lambda_median.png")
        self.save_figure(module, self.histogram_figure(), "lambda_histogram.png")
        self.write_csv(Path(module.run_dir) / f"{self.name}_lambdas.csv")

    def histogram(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Counts of the current λ per category in five equal buckets over [0, A·f(θ_init)] (Fig. 4).

        Adam only lowers θ (its gradient is ≥ 0), so every λ lies in that range; np.histogram's last
        bucket includes its right edge, i.e. the λ that never moved.
        """
        lambdas = self.lambdas().detach().cpu().numpy()
        upper = max(self.initial_lambda(), float(lambdas.max()))
        edges = np.linspace(0.0, upper, HISTOGRAM_BUCKETS + 1)
        categories = np.asarray(self.target_categories)
        counts = {
            category: np.histogram(lambdas[categories == category], bins=edges)[0]
            for category in self.present_categories()
        }
        return counts, edges

    def median_figure(self):
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        steps = [entry["step"] for entry in self.lambda_history]
        categories = self.present_categories()
        for category in categories:
            axis.plot(steps, [entry[category] for entry in self.lambda_history], label=category)
        axis.set(xlabel="iteration", ylabel="median λ", title="Adaptive L2: median λ per category")
        top = max([self.initial_lambda(), *(entry[c] for entry in self.lambda_history for c in categories)])
        axis.set_ylim(0, 1.05 * top)
        axis.legend()
        return figure

    def histogram_figure(self):
        import matplotlib.pyplot as plt

        counts, edges = self.histogram()
        figure, axis = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(counts)
        positions = np.arange(HISTOGRAM_BUCKETS)
        for index, (category, values) in enumerate(counts.items()):
            offset = (index - (len(counts) - 1) / 2) * width
            axis.bar_label(axis.bar(positions + offset, values, width, label=category), fontsize=7)
        # In units of 10⁻³; the last bucket includes its right edge (np.histogram).
        bounds = zip(edges[:-1] * 1e3, edges[1:] * 1e3, strict=True)
        closing = [")"] * (HISTOGRAM_BUCKETS - 1) + ["]"]
        labels = [f"[{low:.2g}, {high:.2g}{end}" for (low, high), end in zip(bounds, closing, strict=True)]
        axis.set_xticks(positions, labels)
        axis.set(xlabel="λ (×10⁻³)", ylabel="number of tensors", title="Adaptive L2: final λ per category")
        axis.legend()
        return figure

    def write_csv(self, path: Path) -> None:
        thetas = self.theta_vector().detach().cpu().tolist()
        lambdas = self.lambdas().detach().cpu().tolist()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["name", "category", "theta", "lambda"])
            writer.writerows(zip(self.target_names, self.target_categories, thetas, lambdas, strict=True))

    # ------------------------------------------------------------------ checkpointing of the history
    def get_extra_state(self) -> dict[str, Any]:
        return {"lambda_history": list(self.lambda_history)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.lambda_history = list(state["lambda_history"])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, amplitude={self.amplitude}, c={self.c}, theta_init={self.theta_init}, "
            f"tensors={len(self.target_names)}"
        )


class _AdaptiveL2Penalty(torch.autograd.Function):
    """Σₙ A·f(θₙ)‖wₙ‖² of its inputs θ₁…θ_K, w₁…w_K; backward adds the gradients at the end of the pass."""

    @staticmethod
    def forward(ctx, regularizer: AdaptiveL2, count: int, *tensors: torch.Tensor) -> torch.Tensor:
        theta = torch.stack(tensors[:count])
        lambdas = regularizer.amplitude * hard_sigmoid(theta, regularizer.c)
        norms = squared_norms(tensors[count:])
        ctx.regularizer, ctx.count = regularizer, count
        ctx.save_for_backward(theta, lambdas, norms, *tensors)
        return (lambdas * norms).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, ...]:
        regularizer, count = ctx.regularizer, ctx.count
        theta, lambdas, norms, *tensors = ctx.saved_tensors
        thetas, parameters = tensors[:count], tensors[count:]
        needs_grad = ctx.needs_input_grad[2:]
        amplitude, c = regularizer.amplitude, regularizer.c
        # g·∂/∂θₙ = g·A·f'(θₙ)·‖wₙ‖² with f' = 1/(2c) on [−c, c] (eq. 5's linear piece, ±c included), else 0.
        theta_grads = (((theta >= -c) & (theta <= c)) * (amplitude / (2 * c)) * norms * grad).unbind()
        coefficients = lambdas * (2 * grad)  # g·∂/∂wₙ = 2gλₙ·wₙ

        def accumulate() -> None:
            chosen = [n for n in range(count) if needs_grad[n]]
            add_to_grads([thetas[n] for n in chosen], [theta_grads[n] for n in chosen])
            trainable = [n for n in range(len(parameters)) if needs_grad[count + n]]
            if trainable:
                buffer = regularizer._spread_buffer(parameters)
                buffer.spread(coefficients)
                add_products_to_grads(
                    [parameters[n] for n in trainable], [buffer.views[n] for n in trainable]
                )

        after_backward(accumulate)
        return (None,) * len(ctx.needs_input_grad)
