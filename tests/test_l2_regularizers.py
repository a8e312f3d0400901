"""Constant and adaptive L2 (AdaptiveReID eqs. (3)–(8)) against direct evaluations of the equations."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext
from reidreg.regularizers.adaptive_l2 import AdaptiveL2, hard_sigmoid
from reidreg.regularizers.constant_l2 import ConstantL2
from reidreg.regularizers.l2_targets import L2_CATEGORIES, l2_targets

A, C = 0.005, 2.5


def paper_f(x: float, c: float = C) -> float:
    """Eq. 5, literally."""
    if x < -c:
        return 0.0
    if x > c:
        return 1.0
    return x / (2 * c) + 0.5


def small_net() -> nn.Sequential:
    """Every category once: conv kernel+bias, BN γ/β (2d and 1d), dense kernel+bias; random values."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=True),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(3),
        nn.Linear(3, 4),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def attached(regularizer, model: nn.Module):
    regularizer.attach(SimpleNamespace(model=model))
    return regularizer


def hook_module(model: nn.Module, global_step: int = 0, run_dir=None) -> SimpleNamespace:
    """The parts of ReIDModule that ``on_train_end`` uses."""
    return SimpleNamespace(
        model=model, global_step=global_step, run_dir=run_dir, log_image=lambda *args, **kwargs: None
    )


def context(model: nn.Module, global_step: int = 0) -> StepContext:
    return StepContext(model, loss=None, global_step=global_step)


def direct_squared_norms(model: nn.Module, names: list[str]) -> torch.Tensor:
    parameters = dict(model.named_parameters())
    return torch.stack([(parameters[name].detach() ** 2).sum() for name in names])


# ---------------------------------------------------------------------------------------- coverage
def test_targets_are_exactly_the_conv_bn_linear_tensors_of_a_reid_model():
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=5, stripe_channels=8)
    direct = [
        (module, name)
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.BatchNorm1d | nn.BatchNorm2d | nn.Linear)
        for name in ("weight", "bias")
        if getattr(module, name) is not None
    ]
    targets = l2_targets(model)
    assert len(targets) == len(direct) == len(list(model.parameters()))
    assert {id(t.parameter) for t in targets} == {id(getattr(m, n)) for m, n in direct}
    assert [t.name for t in targets] == [name for name, _ in model.named_parameters()]  # deterministic order
    # No conv bias in the timm backbone: only the two regional 3×3 convs have one; no dense bias.
    assert [t.name for t in targets if t.category == "conv_bias"] == [
        "stripes.0.conv.bias",
        "stripes.1.conv.bias",
    ]
    assert not [t for t in targets if t.category == "dense_bias"]
    regularizer = attached(AdaptiveL2(), model)
    assert len(regularizer.theta) == len(direct)
    assert {id(p) for p in regularizer.parameters()}.isdisjoint(id(p) for p in model.parameters())


def test_categories_by_module_type_and_uncovered_parameters_warn():
    net = small_net()
    net.append(nn.PReLU())
    with pytest.warns(UserWarning, match=r"\['7.weight'\]"):
        targets = l2_targets(net)
    assert [(t.name, t.category) for t in targets] == [
        ("0.weight", "conv_kernel"),
        ("0.bias", "conv_bias"),
        ("1.weight", "bn_gamma"),
        ("1.bias", "bn_beta"),
        ("5.weight", "bn_gamma"),
        ("5.bias", "bn_beta"),
        ("6.weight", "dense_kernel"),
        ("6.bias", "dense_bias"),
    ]
    with pytest.raises(ValueError, match="unknown L2 categories"):
        l2_targets(small_net(), ["conv_kernel", "bn_weight"])


def test_categories_option_excludes_what_it_says():
    net = small_net()
    kept = ["conv_kernel", "dense_kernel"]
    constant = attached(ConstantL2(lam=0.1, categories=kept), net)
    assert constant.target_names == ["0.weight", "6.weight"]
    expected = 0.1 * ((net[0].weight ** 2).sum() + (net[6].weight ** 2).sum())
    torch.testing.assert_close(constant.penalty(net), expected)
    adaptive = attached(AdaptiveL2(categories=["bn_gamma", "bn_beta"]), net)
    assert adaptive.target_categories == ["bn_gamma", "bn_beta", "bn_gamma", "bn_beta"]
    assert len(adaptive.theta) == 4


# ---------------------------------------------------------------------------------------- constant L2
def test_constant_l2_value_and_gradient_eq3():
    net, lam = small_net(), 0.005
    with torch.no_grad():
        net[1].bias.zero_()  # a zero tensor (BN β at init): gradient 0, not NaN
    regularizer = attached(ConstantL2(lam=lam), net)
    terms = regularizer.transform_gradients(context(net), optimizer=None)  # into .grad, before the step
    expected = lam * sum((p.detach() ** 2).sum() for p in net.parameters())
    torch.testing.assert_close(terms["penalty"], expected)
    for p in net.parameters():
        torch.testing.assert_close(p.grad, 2 * lam * p.detach())


def test_decoupled_mode_with_adam_equals_adamw_step_for_step():
    lam, lrs = 0.05, (1e-2, 3e-3)
    net_a, net_b = small_net(), small_net()
    net_a[1].weight.requires_grad_(False)  # frozen: AdamW does not decay it (no gradient), nor do we
    net_b[1].weight.requires_grad_(False)

    def groups(net: nn.Sequential) -> list[dict]:  # two param groups with their own lr
        return [
            {"params": list(net[:2].parameters()), "lr": lrs[0]},
            {"params": list(net[2:].parameters()), "lr": lrs[1]},
        ]

    adam = torch.optim.Adam(groups(net_a), weight_decay=0.0)
    adamw = torch.optim.AdamW(groups(net_b), weight_decay=lam)
    regularizer = attached(ConstantL2(lam=lam, mode="decoupled"), net_a)
    assert regularizer.loss_terms(SimpleNamespace(model=net_a)) == {}
    frozen = net_a[1].weight.detach().clone()
    torch.manual_seed(1)
    images = torch.randn(5, 2, 6, 6)
    for step in range(4):
        if step == 2:  # a schedule change: each group's current lr is the one that counts
            for group_a, group_b in zip(adam.param_groups, adamw.param_groups, strict=True):
                group_a["lr"] = group_b["lr"] = group_a["lr"] / 2
        for net, optimizer in ((net_a, adam), (net_b, adamw)):
            optimizer.zero_grad(set_to_none=True)
            net(images).square().mean().backward()
        expected_penalty = lam * direct_squared_norms(net_a, regularizer.target_names).sum()
        logs = regularizer.transform_gradients(context(net_a), adam)
        torch.testing.assert_close(logs["penalty"], expected_penalty)
        adam.step()
        adamw.step()
        for p_a, p_b in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(p_a, p_b, rtol=0, atol=0)
    assert torch.equal(net_a[1].weight, frozen)


# ---------------------------------------------------------------------------------------- adaptive L2
def test_hard_sigmoid_eq5_at_and_around_c():
    eps = 1e-3
    points = [-C - eps, -C, -C + eps, 0.0, C - eps, C, C + eps]
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    y = hard_sigmoid(x, C)
    torch.testing.assert_close(y, torch.tensor([paper_f(p) for p in points], dtype=torch.float64))
    assert y.tolist()[:2] == [0.0, 0.0] and y.tolist()[-2:] == [1.0, 1.0] and y[3] == 0.5
    y.sum().backward()
    expected_slope = [0.0, 1 / (2 * C), 1 / (2 * C), 1 / (2 * C), 1 / (2 * C), 1 / (2 * C), 0.0]
    torch.testing.assert_close(x.grad, torch.tensor(expected_slope, dtype=torch.float64))
    # Not torch's hardsigmoid (c = 3): they differ inside the linear range.
    assert not torch.isclose(hard_sigmoid(torch.tensor(1.0)), nn.functional.hardsigmoid(torch.tensor(1.0)))


def set_thetas(regularizer: AdaptiveL2, values: list[float]) -> None:
    with torch.no_grad():
        for theta, value in zip(regularizer.theta, values, strict=True):
            theta.fill_(value)


def test_lambdas_eq7_lie_in_0_A():
    regularizer = attached(AdaptiveL2(amplitude=A, c=C), small_net())
    torch.testing.assert_close(regularizer.lambdas(), torch.full((8,), A / 2))  # θ_init = 0 → A/2
    values = [-100.0, -3.0, -2.5, -0.7, 0.4, 2.5, 3.0, 100.0]
    set_thetas(regularizer, values)
    lambdas = regularizer.lambdas()
    assert ((lambdas >= 0) & (lambdas <= A)).all()
    torch.testing.assert_close(lambdas, torch.tensor([A * paper_f(v) for v in values]))


def test_penalty_eq8_value_and_gradients_in_theta_and_w():
    net = small_net()
    regularizer = attached(AdaptiveL2(amplitude=A, c=C), net)
    values = [-3.0, -2.4, -1.0, 0.0, 0.3, 1.7, 2.4, 3.5]  # two outside (−c, c), six inside
    set_thetas(regularizer, values)
    norms = direct_squared_norms(net, regularizer.target_names)
    penalty = regularizer.transform_gradients(context(net), optimizer=None)["penalty"]  # into .grad
    torch.testing.assert_close(penalty, sum(A * paper_f(v) * n for v, n in zip(values, norms, strict=True)))
    for value, norm, theta in zip(values, norms, regularizer.theta, strict=True):
        expected = A / (2 * C) * norm if -C < value < C else torch.tensor(0.0)
        torch.testing.assert_close(theta.grad, expected)  # ∂L/∂θₙ = A/(2c)·‖wₙ‖² inside, 0 outside
    parameters = dict(net.named_parameters())
    for name, value in zip(regularizer.target_names, values, strict=True):
        p = parameters[name]
        torch.testing.assert_close(p.grad, 2 * A * paper_f(value) * p.detach())  # ∂L/∂w = 2λw


def test_adam_step_moves_theta_down_by_lr_and_leaves_zero_norm_tensors():
    net = small_net()
    with torch.no_grad():
        net[5].bias.zero_()  # ‖β‖² = 0 → ∂L/∂θ = 0: Adam leaves its θ at 0
    regularizer = attached(AdaptiveL2(), net)
    lr = 1e-3
    optimizer = torch.optim.Adam([*net.parameters(), *regularizer.parameters()], lr=lr)
    regularizer.transform_gradients(context(net), optimizer)
    optimizer.step()
    moved = torch.full((8,), -lr)
    moved[regularizer.target_names.index("5.bias")] = 0.0
    # Adam's first step is lr·g/(|g| + eps) ≈ lr for g > 0.
    torch.testing.assert_close(regularizer.theta_vector().detach(), moved, rtol=1e-4, atol=1e-9)


def test_frozen_tensors_are_left_out_unless_include_frozen():
    net = small_net()
    net[0].weight.requires_grad_(False)
    regularizer = attached(AdaptiveL2(), net)
    norms = direct_squared_norms(net, regularizer.target_names)
    penalty = regularizer.transform_gradients(context(net), optimizer=None)["penalty"]
    torch.testing.assert_close(penalty, A / 2 * norms[1:].sum())
    assert regularizer.theta[0].grad is None  # Adam skips it, as it skips the frozen weight
    assert regularizer.theta[1].grad is not None
    including = attached(AdaptiveL2(include_frozen=True), net)
    torch.testing.assert_close(including.penalty(net), A / 2 * norms.sum())


def test_lambda_median_logging_and_history_eq7():
    net = small_net()
    regularizer = attached(AdaptiveL2(log_every_n_steps=3), net)
    values = [-1.0, 0.5, -2.0, 0.1, 1.0, -0.5, 2.0, 0.0]
    set_thetas(regularizer, values)
    lambdas = np.array([A * paper_f(v) for v in values])
    categories = np.array(regularizer.target_categories)
    logged = {}
    for step in range(7):
        logs = regularizer.transform_gradients(context(net, step), optimizer=None)
        logged[step] = {key: value for key, value in logs.items() if key.startswith("lambda_median/")}
    assert [step for step, logs in logged.items() if logs] == [2, 5]  # Lightning writes at (step+1) % n == 0
    expected = {
        c: float(np.median(lambdas[categories == c])) for c in dict.fromkeys(regularizer.target_categories)
    }
    assert set(logged[2]) == {f"lambda_median/{c}" for c in L2_CATEGORIES}
    for category, value in expected.items():
        assert logged[2][f"lambda_median/{category}"] == pytest.approx(value)
    assert [entry["step"] for entry in regularizer.lambda_history] == [0, 2, 5]  # + the initial λ
    assert regularizer.lambda_history[1] == pytest.approx({"step": 2, **expected})


def test_history_and_theta_round_trip_through_state_dict():
    net = small_net()
    regularizer = attached(AdaptiveL2(log_every_n_steps=1), net)
    set_thetas(regularizer, [float(v) for v in torch.linspace(-2, 2, 8)])
    for step in range(3):
        regularizer.transform_gradients(context(net, step), optimizer=None)
    restored = attached(AdaptiveL2(log_every_n_steps=1), net)
    restored.load_state_dict(regularizer.state_dict())
    assert torch.equal(restored.theta_vector(), regularizer.theta_vector())
    assert restored.lambda_history == regularizer.lambda_history and len(restored.lambda_history) == 3


def test_final_reports_histogram_fig4_and_csv(tmp_path):
    net = small_net()
    regularizer = attached(AdaptiveL2(), net)
    regularizer.name = "adaptive_l2"
    # λ = A·f(θ) = 0.0005·k at θ = 2c(0.1k − 0.5): buckets of width 0.0005 over [0, 0.0025].
    lambdas = [0.0, 0.0002, 0.0007, 0.0011, 0.0016, 0.0024, 0.0025, 0.0025]
    set_thetas(regularizer, [2 * C * (lam / A - 0.5) for lam in lambdas])
    counts, edges = regularizer.histogram()
    np.testing.assert_allclose(edges, [0, 0.0005, 0.001, 0.0015, 0.002, 0.0025])
    by_category = {c: np.zeros(5, int) for c in counts}
    for lam, category in zip(lambdas, regularizer.target_categories, strict=True):
        by_category[category][min(int(lam / 0.0005 + 1e-6), 4)] += 1
    for category in counts:
        np.testing.assert_array_equal(counts[category], by_category[category])
    regularizer.on_train_end(hook_module(net, global_step=7, run_dir=tmp_path))
    assert (tmp_path / "plots" / "lambda_median.png").stat().st_size > 0
    assert (tmp_path / "plots" / "lambda_histogram.png").stat().st_size > 0
    with (tmp_path / "adaptive_l2_lambdas.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["name"] for row in rows] == regularizer.target_names
    np.testing.assert_allclose([float(row["lambda"]) for row in rows], lambdas, atol=1e-9)
    assert regularizer.lambda_history[-1]["step"] == 7  # the final λ closes the Fig. 3 curve


# ---------------------------------------------------------------------------------------- end to end
def _thetas_in_checkpoint(state: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    return torch.stack([state[f"regularizers.adaptive_l2.theta.{n}"] for n in range(count)])


def _final_thetas(run_dir: Path) -> tuple[list[dict[str, str]], torch.Tensor]:
    with (run_dir / "adaptive_l2_lambdas.csv").open() as file:
        rows = list(csv.DictReader(file))
    return rows, torch.tensor([float(row["theta"]) for row in rows])


def test_end_to_end_adaptive_l2_writes_fig3_fig4_and_csv(tiny_config):
    from reidreg.train import train

    cfg = tiny_config("regularizer=adaptive_l2", "trainer.fast_dev_run=true", "test=false")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    for plot in ("lambda_median.png", "lambda_histogram.png"):
        assert (run / "plots" / plot).stat().st_size > 0
    rows, thetas = _final_thetas(run)
    assert {row["category"] for row in rows} == set(L2_CATEGORIES) - {"dense_bias"}
    assert (thetas <= 0).all() and (thetas < 0).any()  # θ moved from 0, and only downwards


@pytest.mark.slow
def test_end_to_end_adaptive_l2_resume_restores_theta_and_history(tmp_path, tiny_config):
    from reidreg.train import build_module, train

    common = ("regularizer=adaptive_l2", "test=false", "regularizer.adaptive_l2.log_every_n_steps=1")
    first = tiny_config(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'a'}")
    train(first)
    run = tmp_path / "a"
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "reg/adaptive_l2/penalty" in header and "reg/adaptive_l2/lambda_median/conv_kernel" in header
    rows, thetas = _final_thetas(run)

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    saved = _thetas_in_checkpoint(state, len(rows))
    torch.testing.assert_close(saved, thetas, rtol=0, atol=0)  # the CSV holds the final θ exactly
    # What Lightning does on resume: load the checkpoint's state dict into a freshly built module.
    num_classes = state["model.global_head.classifier.weight"].shape[0]
    module = build_module(first, num_classes, tmp_path / "unused")
    module.load_state_dict(state)
    regularizer = module.regularizers["adaptive_l2"]
    assert torch.equal(regularizer.theta_vector().detach(), saved)
    history = regularizer.lambda_history
    assert [entry["step"] for entry in history] == list(range(checkpoint["global_step"]))

    last = run / "checkpoints" / "last.ckpt"
    resumed = tiny_config(
        *common, "trainer.max_epochs=2", f"ckpt_path={last}", f"paths.output_dir={tmp_path / 'b'}"
    )
    train(resumed)
    state_b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    history_b = state_b["state_dict"]["regularizers.adaptive_l2._extra_state"]["lambda_history"]
    assert history_b[: len(history)] == history  # the first run's history survived the resume
    assert [entry["step"] for entry in history_b] == list(range(state_b["global_step"]))
    assert (_thetas_in_checkpoint(state_b["state_dict"], len(rows)) <= saved).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_end_to_end_constant_l2_trains_and_logs_its_penalty(tiny_config, mode):
    from reidreg.train import train

    cfg = tiny_config(
        "regularizer=constant_l2", f"regularizer.constant_l2.mode={mode}", "trainer.max_epochs=1"
    )
    train(cfg)
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as file:
        logged = [
            float(row["reg/constant_l2/penalty"])
            for row in csv.DictReader(file)
            if row["reg/constant_l2/penalty"]
        ]
    assert logged and all(p > 0 for p in logged)
