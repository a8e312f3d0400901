"""The public training step: L2 penalties as gradient transforms (exact, no side effects on autograd), their
opt-in differentiable path, and the rule that nothing else acts while a phase (LinR) owns the step."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reidreg.losses import ReIDLoss
from reidreg.regularizers import StepContext, TrainStep
from reidreg.regularizers.adaptive_l2 import AdaptiveL2, hard_sigmoid
from reidreg.regularizers.constant_l2 import ConstantL2
from reidreg.regularizers.linr import LinR
from reidreg.training.step import TrainingStep
from tests.test_l2_regularizers import small_net
from tests.test_linr import TwoHeadNet

A, C, LAM = 0.005, 2.5, 0.01
THETAS = [-3.0, -C, -2.4, -0.3, 0.0, 1.1, 2.4, C]  # outside, at ±c (linear piece), inside


def task_loss(net: nn.Module) -> torch.Tensor:
    images = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1)).to(net[0].weight.dtype)
    return net(images).square().mean()


def attached(regularizer, net: nn.Module):
    regularizer.attach(StepContext(net, loss=None))
    if isinstance(regularizer, AdaptiveL2):
        with torch.no_grad():
            for theta, value in zip(regularizer.theta, THETAS, strict=True):
                theta.fill_(value)
    return regularizer


def paper_penalties(net: nn.Module, thetas) -> torch.Tensor:
    """Eqs. 3 and 8 by plain autograd: λ Σ‖w‖² + Σ A·f(θₙ)‖wₙ‖²."""
    params = list(net.parameters())
    constant = LAM * sum(p.square().sum() for p in params)
    return constant + sum(
        A * hard_sigmoid(t, C) * p.square().sum() for t, p in zip(thetas, params, strict=True)
    )


def test_float64_gradient_transforms_match_autograd_of_the_paper_penalties_to_1e_12():
    net, reference = small_net().double(), small_net().double()
    step = TrainingStep([attached(ConstantL2(lam=LAM), net), attached(AdaptiveL2(amplitude=A, c=C), net)])
    adaptive = step.regularizers[1]
    assert adaptive.theta[0].dtype == torch.float64
    context = StepContext(net, loss=None)
    task_loss(net).backward()
    step.transform_gradients(context, optimizer=None)

    thetas = [nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in THETAS]
    (task_loss(reference) + paper_penalties(reference, thetas)).backward()
    pairs = [
        *zip(net.parameters(), reference.parameters(), strict=True),
        *zip(adaptive.theta, thetas, strict=True),
    ]
    for ours, exact in pairs:
        assert (ours.grad - exact.grad).abs().max() <= 1e-12
    penalty = context.logs["reg/regularizer/penalty"]
    assert penalty.dtype == torch.float64


@pytest.mark.parametrize(
    "make", [lambda **kw: ConstantL2(lam=LAM, **kw), lambda **kw: AdaptiveL2(amplitude=A, **kw)]
)
def test_autograd_sees_the_penalty_only_in_differentiable_mode(make):
    """Default: no loss term, so ``torch.autograd.grad`` and ``torch.func.grad`` of the loss give the task
    gradient and leave ``.grad`` untouched; the penalty's gradient comes only from the gradient transform.
    ``differentiable=True``: the penalty is a loss term, seen by both, also with ``create_graph``."""
    net = small_net().eval()  # running statistics: torch.func forbids updating them
    params = list(net.parameters())
    context = StepContext(net, loss=None)
    step = TrainStep(context, torch.empty(0), torch.empty(0), outputs={}, task_losses={})
    task_grads = torch.autograd.grad(task_loss(net), params)

    transformed = attached(make(), net)
    assert transformed.loss_terms(step) == {}
    loss = task_loss(net) + sum(transformed.loss_terms(step).values())
    for got, want in zip(torch.autograd.grad(loss, params), task_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(p.grad is None for p in params)  # no side effect
    transformed.transform_gradients(context, optimizer=None)
    penalty_grads = [p.grad.clone() for p in params]

    differentiable = attached(make(differentiable=True), net)
    assert differentiable.ddp_ignored_parameters() == []  # θ in the graph: DDP treats them as usual
    (term,) = differentiable.loss_terms(step).values()
    loss = task_loss(net) + term
    for got, task, penalty in zip(torch.autograd.grad(loss, params), task_grads, penalty_grads, strict=True):
        torch.testing.assert_close(got, task + penalty)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, penalty_grads, strict=True))  # untouched

    # create_graph: the penalty's Hessian-vector product is 2λₙ·v, so (H·v)⊙w = (2λₙw)⊙v.
    grads = torch.autograd.grad(differentiable.penalty(net), params, create_graph=True)
    vectors = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors, strict=True)), params)
    for h, v, p, g in zip(hvp, vectors, params, penalty_grads, strict=True):
        torch.testing.assert_close(h * p, g * v)

    # torch.func.grad over the network's parameters (functional_call): the same two answers.
    names = [f"net.{name}" for name, _ in net.named_parameters()]
    for regularizer, extra in ((transformed, [0.0] * len(params)), (differentiable, penalty_grads)):
        objective = Objective(net, regularizer, step)

        def loss_of(values, objective=objective):
            return torch.func.functional_call(
                objective, dict(zip(names, values, strict=True)), (), strict=False
            )

        got = torch.func.grad(loss_of)(tuple(p.detach() for p in params))
        for g, task, e in zip(got, task_grads, extra, strict=True):
            torch.testing.assert_close(g, task + e)


class Objective(nn.Module):
    """Task loss + the regularizer's loss terms, as a module for ``torch.func.functional_call``."""

    def __init__(self, net: nn.Module, regularizer, step: TrainStep) -> None:
        super().__init__()
        self.net, self.regularizer, self.step = net, regularizer, step

    def forward(self) -> torch.Tensor:
        return task_loss(self.net) + sum(self.regularizer.loss_terms(self.step).values())


# ----------------------------------------------------------------------------------------- phases
def train_two_steps(*, with_l2: str | None, epoch: int) -> list[torch.Tensor]:
    """Two steps of TrainingStep with LinR (refining from epoch 1) and, optionally, constant L2; the
    phase's optimizer step runs the gradient transforms between backward and step, as Lightning's does."""
    torch.manual_seed(0)
    net = TwoHeadNet()
    linr = LinR(rounds=1, cls_steps=1, linr_steps=1, start_epoch=1)
    linr.attach(SimpleNamespace(model=net, freeze_backbone_epochs=0))
    linr.extra_optimizers(SimpleNamespace(model=net))
    l2 = [attached(ConstantL2(lam=0.5, mode=with_l2), net)] if with_l2 else []
    step = TrainingStep([linr, *l2])
    main = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        context = StepContext(net, ReIDLoss(), epoch=epoch, stop=lambda: None)

        def optimize(loss, optimizer, context=context):
            optimizer.zero_grad()
            loss.backward()
            step.transform_gradients(context, optimizer)
            optimizer.step()

        context.optimize = optimize
        step(context, torch.randn(8, 1, 2, 3), torch.arange(8) // 2, main)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_while_linr_owns_the_step_no_other_regularizer_acts(mode):
    """The documented rule: coupled and decoupled L2 alike stop during LinR's refinement steps."""
    alone, with_l2 = train_two_steps(with_l2=None, epoch=1), train_two_steps(with_l2=mode, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(alone, with_l2, strict=True))
    # ... while in standard steps (epoch 0, before refinement) the L2 acts: the check can fail.
    alone, with_l2 = train_two_steps(with_l2=None, epoch=0), train_two_steps(with_l2=mode, epoch=0)
    assert not all(torch.equal(a, b) for a, b in zip(alone, with_l2, strict=True))


# ----------------------------------------------------------------------------------------- a new method
TOYS = {
    "toy_relabel": '''
"""Toy input transform: each identity of the batch trains under the label of another one."""
import torch

from reidreg.regularizers import Regularizer


class RotateIdentities(Regularizer):
    def transform_inputs(self, ctx, images, labels):
        identities = labels.unique()
        rotated = identities.roll(1)[torch.searchsorted(identities, labels)]
        return images, rotated, {"changed": (rotated != labels).float().mean()}
''',
    "toy_loss": '''
"""Toy loss term: weight · mean squared norm of every objective module's embedding."""
from reidreg.regularizers import Regularizer
from reidreg.options.rules import number


class EmbeddingNorm(Regularizer):
    OPTION_RULES = {"weight": number(ge=0)}

    def __init__(self, *, weight: float = 0.01):
        super().__init__()
        self.weight = weight

    def loss_terms(self, step):
        norms = [out.embedding.square().sum(1).mean() for out in step.outputs.values()]
        return {"norm": self.weight * sum(norms)}
''',
    "toy_grad": '''
"""Toy gradient transform: clip the global gradient norm before the optimizer step."""
import torch

from reidreg.regularizers import Regularizer


class ClipGradients(Regularizer):
    def __init__(self, *, max_norm: float = 1.0):
        super().__init__()
        self.max_norm = max_norm

    def transform_gradients(self, ctx, optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        after = torch.nn.utils.get_total_norm([p.grad for p in params])
        return {"norm_before": norm, "norm_after": after}
''',
}
TOY_YAMLS = {
    "toy_relabel": "_target_: toy_relabel.RotateIdentities\n",
    "toy_loss": "_target_: toy_loss.EmbeddingNorm\nweight: 0.01\n",
    "toy_grad": "_target_: toy_grad.ClipGradients\nmax_norm: 0.5\n",
}


def test_a_regularizer_of_each_kind_is_one_python_file_and_one_yaml(tmp_path, monkeypatch, tiny_config):
    code, conf = tmp_path / "code", tmp_path / "conf" / "regularizer"
    code.mkdir()
    conf.mkdir(parents=True)
    for name, source in TOYS.items():
        (code / f"{name}.py").write_text(source)
        (conf / f"{name}.yaml").write_text(f"# @package regularizer.{name}\n{TOY_YAMLS[name]}")
    monkeypatch.syspath_prepend(str(code))
    from reidreg.train import train

    cfg = tiny_config(
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "regularizer=[toy_relabel,toy_loss,toy_grad]",
        "trainer.max_epochs=1",
        "test=false",
    )
    train(cfg)
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    assert rows
    for row in rows:
        assert float(row["reg/toy_relabel/changed"]) == 1.0  # every label changed
        task = sum(float(value) for key, value in row.items() if key.endswith(("/ce", "/triplet")) and value)
        norm = float(row["reg/toy_loss/norm"])
        assert norm > 0 and float(row["train/loss"]) == pytest.approx(task + norm, rel=1e-5)
        assert float(row["reg/toy_grad/norm_after"]) <= 0.5 + 1e-5
        assert float(row["reg/toy_grad/norm_before"]) > 0
