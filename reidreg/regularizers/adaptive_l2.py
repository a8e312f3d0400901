"""Adaptive L2 regularization: Σₙ λₙ‖wₙ‖² with λₙ = A·f(θₙ) and one trainable scalar θₙ per regularised
tensor (Ni et al., "AdaptiveReID: Adaptive L2 Regularization in Person Re-Identification", ICPR 2020,
eqs. 4–8; Figs. 3–4 as reports).

f is eq. 5's hard sigmoid with c = 2.5 (TF2's 0.2x + 0.5; torch's ``hardsigmoid`` has c = 3). The θₙ are
``nn.Parameter`` s of the regularizer, trained and checkpointed with the network. As a gradient transform
(default) it adds, before the optimizer step, in a few foreach operators and in the parameters' dtype:

    ∂/∂wₙ = 2λₙwₙ (trainable wₙ),   ∂/∂θₙ = A·f'(θₙ)·‖wₙ‖²,  f' = 1/(2c) on [−c, c] (±c included), else 0.

The θₙ are not used by the forward pass: DDP ignores them (``ddp_ignored_parameters``); their gradient is
computed from the replicated weights, identical on every rank. ``differentiable=true`` makes the penalty a
loss term through autograd instead. ∂L/∂θₙ ≥ 0, so Adam lowers every θₙ by about lr per step and λ decays
(paper Fig. 3) until θₙ < −c; this is recorded, not corrected. Frozen tensors and their θₙ are left out
unless ``include_frozen`` (a frozen wₙ would only push its θₙ down). Reports: the median λ per category
(``reg/<name>/lambda_median/<category>``, kept in ``lambda_history``, checkpointed), and at the end
``plots/lambda_median.png`` (Fig. 3), ``plots/lambda_histogram.png`` (Fig. 4) and ``<name>_lambdas.csv``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reidreg.errors import ConfigError
from reidreg.metric_keys import LAMBDA_MEDIAN
from reidreg.options.rules import boolean, choice, integer, list_of, number, optional
from reidreg.regularizers.base import LogDict, Regularizer, StepContext, TrainStep
from reidreg.regularizers.foreach import FlatViews, ParameterLookup, add_products_to_grads, add_to_grads
from reidreg.regularizers.l2_targets import L2_CATEGORIES, l2_targets, squared_norms

HISTOGRAM_BUCKETS = 5


def hard_sigmoid(x: torch.Tensor, c: float = 2.5) -> torch.Tensor:
    """Eq. 5, case by case: x = ±c is on the linear piece ("otherwise"), so its gradient there is 1/(2c)."""
    return torch.where(x < -c, 0.0, torch.where(x > c, 1.0, x / (2 * c) + 0.5))


class AdaptiveL2(Regularizer):
    """Σₙ A·f(θₙ) ‖wₙ‖² with one trainable θₙ per regularised tensor (eq. 8)."""

    OPTION_RULES = {
        "amplitude": number(gt=0),
        "c": number(gt=0),
        "theta_init": number(),
        "categories": optional(list_of(choice(*L2_CATEGORIES))),
        "log_every_n_steps": integer(min=1),
        "include_frozen": boolean(),
        "differentiable": boolean(),
    }
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
        differentiable: bool = False,
    ) -> None:
        super().__init__()
        self.differentiable = differentiable
        self.amplitude, self.c, self.theta_init = float(amplitude), float(c), float(theta_init)
        self.categories = None if categories is None else list(categories)
        self.log_every_n_steps, self.include_frozen = log_every_n_steps, include_frozen
        self.target_names: list[str] = []
        self.target_categories: list[str] = []
        # [{"step": global step, "<category>": median λ, ...}, ...] — plain data, saved via get_extra_state.
        self.lambda_history: list[dict[str, float]] = []
        self._lookup = ParameterLookup([])
        self._lambda_views: FlatViews | None = None  # 2λₙ spread over the wₙ, see transform_gradients

    # ------------------------------------------------------------------ the method
    def attach(self, module: Any) -> None:
        targets = l2_targets(module.model, self.categories)
        if not targets:
            raise ConfigError(f"regularizer.{self.name}.categories={self.categories} covers no tensor")
        self.target_names = [target.name for target in targets]
        self.target_categories = [target.category for target in targets]
        self._lookup = ParameterLookup(self.target_names)
        device = targets[0].parameter.device
        # One scalar nn.Parameter per tensor (not one vector): Adam then keeps a separate state, step count
        # included, for every θₙ, as for separate variables in the official code; with a shared vector, a θₙ
        # whose tensor was frozen for a while would restart with a bias correction meant for a late step.
        self.theta = nn.ParameterList(
            nn.Parameter(torch.tensor(self.theta_init, device=device, dtype=targets[0].parameter.dtype))
            for _ in self.target_names
        )

    def ddp_ignored_parameters(self) -> list[str]:
        return [] if self.differentiable else [f"theta.{n}" for n in range(len(self.theta))]

    def theta_vector(self) -> torch.Tensor:
        """All θₙ as one 1-D tensor (differentiable), in the order of ``target_names``."""
        return torch.stack(list(self.theta))

    def lambdas(self) -> torch.Tensor:
        """λₙ = A·f(θₙ) (eq. 7), one per regularised tensor, differentiable in θ."""
        return self.amplitude * hard_sigmoid(self.theta_vector(), self.c)

    def penalized(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The wₙ in the sum and their θₙ: all, or (``include_frozen=False``) the trainable wₙ only."""
        parameters, thetas = self._lookup(model), list(self.theta)
        if self.include_frozen:
            return parameters, thetas
        kept = [n for n, parameter in enumerate(parameters) if parameter.requires_grad]
        return [parameters[n] for n in kept], [thetas[n] for n in kept]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Σₙ λₙ ‖wₙ‖² (eq. 8), differentiable by autograd in θ and in the weights."""
        parameters, thetas = self.penalized(model)
        lambdas = [self.amplitude * hard_sigmoid(theta, self.c) for theta in thetas]
        return sum(
            (lam * p.square().sum() for lam, p in zip(lambdas, parameters, strict=True)), 0.0 * self.theta[0]
        )

    def loss_terms(self, step: TrainStep) -> dict[str, torch.Tensor]:
        return {"penalty": self.penalty(step.model)} if self.differentiable else {}

    @torch.no_grad()
    def add_penalty_gradients(self, model: nn.Module) -> torch.Tensor:
        """Add ∂/∂θₙ and ∂/∂wₙ of eq. 8 to the ``.grad`` s (module docstring); returns the penalty's value."""
        parameters, thetas = self.penalized(model)
        if not parameters:
            return self.theta[0].new_zeros(())
        theta, norms = torch.stack(thetas), squared_norms(parameters)
        lambdas = self.amplitude * hard_sigmoid(theta, self.c)
        inside = (theta >= -self.c) & (theta <= self.c)
        add_to_grads(thetas, (inside * norms * (self.amplitude / (2 * self.c))).unbind())
        trainable = [n for n, parameter in enumerate(parameters) if parameter.requires_grad]
        if trainable:
            buffer = self._spread_buffer(parameters)
            buffer.spread(2 * lambdas)
            add_products_to_grads([parameters[n] for n in trainable], [buffer.views[n] for n in trainable])
        return (lambdas * norms).sum()

    def _spread_buffer(self, parameters: Sequence[torch.Tensor]) -> FlatViews:
        """A flat buffer with one view per tensor of ``parameters``, kept while they keep shapes and dtype."""
        views, dtype = self._lambda_views, parameters[0].dtype
        if views is None or not views.matches(parameters) or views.flat.dtype != dtype:
            self._lambda_views = FlatViews([p.shape for p in parameters], parameters[0].device, dtype)
        return self._lambda_views

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

    def transform_gradients(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> LogDict:
        logs: LogDict = {} if self.differentiable else {"penalty": self.add_penalty_gradients(ctx.model)}
        # global_step = number of optimizer steps already taken = updates θ has received so far.
        step = ctx.global_step
        # Lightning writes step metrics when (global_step + 1) % trainer.log_every_n_steps == 0.
        log = (step + 1) % self.log_every_n_steps == 0
        if log or step == 0:
            medians = self._record(step)  # step 0 too: λ = A·f(θ_init) before any update (Fig. 3's start)
            if log:
                logs.update({f"{LAMBDA_MEDIAN}/{category}": value for category, value in medians.items()})
        return logs

    def on_train_end(self, module: Any) -> None:
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
