"""Regularizers at a per-step cost independent of the number of tensors.

Two parts: (1) deterministic operator counts of the real training step (``TrainingStep``) — the CPU proxy
for the host work of a launch-bound GPU step (``reidreg.utils.op_count``); (2) the L2 penalties' gradient
transforms against plain autograd of the equations (AdaptiveReID eqs. 3, 8), and SGP's one-draw parameter
noise against its equation.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reidreg.losses import ReIDLoss
from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext, build_regularizers
from reidreg.regularizers.adaptive_l2 import AdaptiveL2, hard_sigmoid
from reidreg.regularizers.constant_l2 import ConstantL2
from reidreg.regularizers.foreach import FlatViews, ParameterLookup
from reidreg.regularizers.random_streams import step_generator
from reidreg.regularizers.sgp import SGP
from reidreg.training.module import ReIDModule
from reidreg.utils.op_count import OpCounter, count_step

A, C = 0.005, 2.5

# ------------------------------------------------------------------------------------------- op counts
VARIANTS = {
    "constant_l2": {"_target_": "reidreg.regularizers.constant_l2.ConstantL2"},
    "constant_l2_decoupled": {"_target_": "reidreg.regularizers.constant_l2.ConstantL2", "mode": "decoupled"},
    "adaptive_l2": {"_target_": "reidreg.regularizers.adaptive_l2.AdaptiveL2"},
    "sgp_sites": {"_target_": "reidreg.regularizers.sgp.SGP", "sites": ["block4"]},
    "sgp_param_grads": {"_target_": "reidreg.regularizers.sgp.SGP", "sites": [], "param_grads": True},
}
# Two networks with different numbers of regularised tensors: 48 and 77.
NETWORKS = {"global_only": {"regional_branches": False}, "four_stripes": {"num_stripes": 4}}
MAX_EXTRA_OPS = 60


def reid_module(network: dict, regularizer: str | None) -> ReIDModule:
    torch.manual_seed(0)
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=4, stripe_channels=8, **network)
    regularizers = build_regularizers({regularizer: VARIANTS[regularizer]} if regularizer else {})
    return ReIDModule(
        model=model,
        loss=ReIDLoss(),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-4, foreach=True),
        regularizers=regularizers,
    )


class CountedStep:
    """ReIDModule's training step run without a Trainer, its operators counted: ``outside`` = everything
    but the optimizer step, ``optimizer`` = Adam(foreach) ``step()``."""

    def __init__(self, module: ReIDModule) -> None:
        self.module = module
        self.optimizer = module.optimizer_factory(params=list(module.parameters()))
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(8, 3, 64, 16, generator=generator)
        self.labels = torch.arange(4).repeat_interleave(2)

    def __call__(self, *, count: bool = False) -> None:
        module = self.module

        def step() -> None:
            module.step(StepContext(module.model, module.loss), self.images, self.labels, self.optimizer)

        if count:
            self.outside, self.optimizer_ops = count_step(step, self.optimizer)
        else:
            step()


def counted(network: dict, regularizer: str | None) -> CountedStep:
    step = CountedStep(reid_module(network, regularizer))
    step()  # Adam's state and the regularizers' buffers are made in the first step
    step(count=True)
    return step


@pytest.fixture(scope="module")
def one_thread():
    """Counts do not depend on threads; on a small shared machine one thread runs these steps ~10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def baselines(one_thread) -> dict[str, CountedStep]:
    return {name: counted(network, None) for name, network in NETWORKS.items()}


def adam_ops_for_scalars(count: int) -> int:
    """Extra operators of an Adam(foreach) step for ``count`` more 0-d parameters (e.g. adaptive L2's θ)."""

    def step_ops(extra: int) -> int:
        params = [nn.Parameter(torch.ones(64)), *(nn.Parameter(torch.ones(())) for _ in range(extra))]
        optimizer = torch.optim.Adam(params, lr=1e-4, foreach=True)
        for _ in range(2):
            for param in params:
                param.grad = torch.ones_like(param)
            with OpCounter() as counter:
                optimizer.step()
        return counter.total

    return step_ops(count) - step_ops(0)


@pytest.mark.parametrize("regularizer", list(VARIANTS))
def test_extra_operators_per_step_are_few_and_independent_of_the_number_of_tensors(baselines, regularizer):
    """At most 60 more aten operators than ``none`` in a whole step, the same number (±2) on a network with
    48 regularised tensors and on one with 77, and no device sync."""
    extra, host_reads = {}, {}
    for name, network in NETWORKS.items():
        step, base = counted(network, regularizer), baselines[name]
        extra[name] = step.outside.total - base.outside.total
        host_reads[name] = step.outside.host_reads - base.outside.host_reads
        optimizer_extra = step.optimizer_ops.total - base.optimizer_ops.total
        # The optimizer does nothing more, except that adaptive L2's θ are more (0-d) parameters for it
        # (non-capturable foreach Adam reads each parameter's step count on the host: CPU tensors).
        thetas = len(getattr(step.module.regularizers[regularizer], "theta", []))
        assert optimizer_extra == (adam_ops_for_scalars(thetas) if thetas else 0), name
    assert all(0 <= ops <= MAX_EXTRA_OPS for ops in extra.values()), extra
    assert abs(extra["global_only"] - extra["four_stripes"]) <= 2, extra
    # No value read back to the host (a device sync on a GPU); SGP's one is its on/off draw, made on a CPU
    # generator on purpose (no device sync wherever the network lives).
    assert host_reads == dict.fromkeys(NETWORKS, 1 if regularizer.startswith("sgp") else 0)


def test_the_count_sees_per_tensor_work(one_thread):
    """The count can fail: a plain differentiable penalty costs operators per tensor (its backward and one
    ``AccumulateGrad`` addition each), which the count shows growing with the network."""
    extra = {}
    for name, network in NETWORKS.items():
        parameters = list(reid_module(network, None).model.parameters())
        for p in parameters:
            p.grad = torch.zeros_like(p)
        with OpCounter() as counter:
            sum(p.square().sum() for p in parameters).backward()
        extra[name] = counter.total
    assert extra["four_stripes"] - extra["global_only"] >= 4 * (77 - 48)


# ------------------------------------------------------------------------------- fused L2 gradients
def net_with_every_category() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=True),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 5, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(5),
        nn.Linear(5, 4),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def task_loss(net: nn.Module) -> torch.Tensor:
    images = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    return net(images).square().mean()


def attached(regularizer, net: nn.Module):
    regularizer.attach(SimpleNamespace(model=net))
    return regularizer


def grads(tensors) -> list[torch.Tensor | None]:
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def assert_same_grads(actual, expected) -> None:
    assert [g is None for g in actual] == [g is None for g in expected]
    for a, e in zip(actual, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


CASES = {
    "penalty_alone": dict(task=False, frozen=False, scale=1.0),  # .grad is None when the penalty's arrives
    "with_task_loss": dict(task=True, frozen=False, scale=1.0),  # .grad already accumulated in the pass
    "gradscaler_scale": dict(task=True, frozen=False, scale=2.0**14),  # loss scaled as by GradScaler
    "frozen_tensor": dict(task=True, frozen=True, scale=1.0),
}


def unscale(net: nn.Module, scale: float) -> None:
    """What GradScaler.unscale_ does before the gradient transforms."""
    for p in net.parameters():
        if p.grad is not None:
            p.grad.div_(scale)


def run_reference(net, penalty_fn, *, task: bool, scale: float, earlier_grads: bool) -> torch.Tensor:
    """Autograd of penalty (+ task loss), the loss scaled as by GradScaler, then unscaled."""
    if earlier_grads:  # a gradient from an earlier backward (accumulation) is added to, not replaced
        task_loss(net).backward()
    penalty = penalty_fn()
    loss = penalty + (task_loss(net) if task else 0.0)
    (loss * scale).backward()
    unscale(net, scale)
    return penalty.detach()


def run_transform(net, regularizer, *, task: bool, scale: float, earlier_grads: bool) -> torch.Tensor:
    """The step's order: backward of the (scaled) task loss, unscaling, then the gradient transform."""
    if earlier_grads:
        task_loss(net).backward()
    if task:
        (task_loss(net) * scale).backward()
    unscale(net, scale)
    return regularizer.transform_gradients(StepContext(net, loss=None), optimizer=None)["penalty"]


@pytest.mark.parametrize("earlier_grads", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_constant_l2_fused_gradient_equals_autograd_of_eq3(case, earlier_grads):
    options, lam = CASES[case], 0.01
    net, reference = net_with_every_category(), net_with_every_category()
    if options["frozen"]:
        net[3].weight.requires_grad_(False)
        reference[3].weight.requires_grad_(False)
    regularizer = attached(ConstantL2(lam=lam), net)
    kwargs = dict(task=options["task"], scale=options["scale"], earlier_grads=earlier_grads)
    value = run_transform(net, regularizer, **kwargs)
    penalty = lambda: lam * sum(p.square().sum() for p in reference.parameters())  # noqa: E731
    expected_value = run_reference(reference, penalty, **kwargs)
    torch.testing.assert_close(value, expected_value)
    assert_same_grads(grads(net.parameters()), grads(reference.parameters()))
    if options["frozen"]:
        assert net[3].weight.grad is None


def reference_adaptive_penalty(net: nn.Module, thetas: list[nn.Parameter], include_frozen: bool):
    """Eq. 8 by plain autograd: Σₙ A·f(θₙ)·‖wₙ‖² over the (trainable, unless include_frozen) tensors."""
    terms = [
        A * hard_sigmoid(theta, C) * p.square().sum()
        for theta, p in zip(thetas, net.parameters(), strict=True)
        if include_frozen or p.requires_grad
    ]
    return sum(terms)


THETAS = [-3.0, -C, -2.4, -0.3, 0.0, 1.1, 2.4, C, 3.0, 100.0]  # inside, at ±c (linear piece), outside


@pytest.mark.parametrize("include_frozen", [False, True])
@pytest.mark.parametrize("earlier_grads", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_adaptive_l2_fused_gradients_equal_autograd_of_eq8(case, earlier_grads, include_frozen):
    options = CASES[case]
    net, reference = net_with_every_category(), net_with_every_category()
    if options["frozen"]:
        net[3].weight.requires_grad_(False)
        reference[3].weight.requires_grad_(False)
    regularizer = attached(AdaptiveL2(amplitude=A, c=C, include_frozen=include_frozen), net)
    values = THETAS[: len(regularizer.theta)]
    reference_thetas = [nn.Parameter(torch.tensor(v)) for v in values]
    with torch.no_grad():
        for theta, value in zip(regularizer.theta, values, strict=True):
            theta.fill_(value)
    kwargs = dict(task=options["task"], scale=options["scale"], earlier_grads=earlier_grads)
    value = run_transform(net, regularizer, **kwargs)
    expected_value = run_reference(
        reference, lambda: reference_adaptive_penalty(reference, reference_thetas, include_frozen), **kwargs
    )
    for theta in reference_thetas:  # unscaled like the network's gradients
        if theta.grad is not None:
            theta.grad.div_(options["scale"])
    torch.testing.assert_close(value, expected_value)
    assert_same_grads(grads(net.parameters()), grads(reference.parameters()))
    # θ of a left-out frozen tensor: no gradient, so Adam leaves it and its state untouched.
    assert_same_grads(grads(regularizer.theta), grads(reference_thetas))
    frozen_index = regularizer.target_names.index("3.weight")
    assert (regularizer.theta[frozen_index].grad is None) == (options["frozen"] and not include_frozen)


def test_fused_gradients_under_bfloat16_autocast_and_float16_gradscaler():
    """Under autocast the penalties stay float32; with fp16's GradScaler, the scaled backward and unscale_
    give the float32 gradients (the scale is a power of two: exact)."""

    def penalty_grads(precision: torch.dtype | None) -> list[torch.Tensor]:
        net = net_with_every_category()
        adaptive = attached(AdaptiveL2(amplitude=A, c=C), net)
        constant = attached(ConstantL2(lam=0.003), net)
        params = [*net.parameters(), *adaptive.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, enabled=precision is torch.float16)
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            loss = adaptive.penalty(net) + constant.penalty(net)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        return [p.grad for p in params]

    full = penalty_grads(None)
    for precision in (torch.bfloat16, torch.float16):
        for low, exact in zip(penalty_grads(precision), full, strict=True):
            torch.testing.assert_close(low, exact, rtol=1e-6, atol=0)


def test_penalty_follows_a_replaced_module():
    """Tensors are looked up by name at each step: a module replaced after attach (SyncBatchNorm
    conversion) is the one penalised."""
    net = net_with_every_category()
    regularizer = attached(ConstantL2(lam=1.0), net)
    replacement = nn.BatchNorm2d(3)
    with torch.no_grad():
        replacement.weight.fill_(2.0)
    net[1] = replacement
    regularizer.penalty(net).backward()
    torch.testing.assert_close(replacement.weight.grad, torch.full((3,), 4.0))
    (looked_up,) = ParameterLookup(["1.weight"])(net)
    assert looked_up is replacement.weight


# --------------------------------------------------------------------------------- SGP, flat buffers
def test_flat_views_spread_and_scale_per_view():
    shapes = [torch.Size([2, 3]), torch.Size([3]), torch.Size([]), torch.Size([4, 1, 3])]  # gcd 1
    views = FlatViews(shapes, "cpu")
    assert [v.shape for v in views.views] == shapes and views.matches([torch.empty(s) for s in shapes])
    assert not views.matches([torch.empty(s) for s in shapes[:-1]])
    values = torch.tensor([1.0, -2.0, 3.0, 0.5])
    views.spread(values)
    for view, value in zip(views.views, values, strict=True):
        assert torch.equal(view, torch.full_like(view, value))
    views.scale_(torch.tensor([2.0, 1.0, 0.0, 4.0]))
    assert [float(v.flatten()[0]) for v in views.views] == [2.0, -2.0, 0.0, 2.0]
    rows = FlatViews([torch.Size([64, 3]), torch.Size([128])], "cpu")  # rows of gcd(192, 128) = 64
    rows.spread(torch.tensor([7.0, 9.0]))
    assert torch.equal(rows.flat, torch.cat([torch.full((192,), 7.0), torch.full((128,), 9.0)]))


def test_sgp_parameter_noise_is_one_draw_split_in_optimizer_order():
    """g̃ₙ = gₙ + σ·rms(gₙ)·ξₙ, ξ = one N(0, I) draw of all gradients' sizes from the (seed, step) stream
    after the on/off draw, split in the optimizer's order — also for sizes that are not multiples of 16."""
    net = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))  # 35, 5, 15, 3 numbers
    loss = net(torch.randn(4, 7, generator=torch.Generator().manual_seed(0))).square().sum()
    loss.backward()
    clean = [p.grad.clone() for p in net.parameters()]
    sgp = SGP(sigma=0.6, sites=[], param_grads=True, seed=11)
    module = SimpleNamespace(model=net, global_step=4)
    sgp.attach(module)
    context = StepContext(net, loss=None, global_step=4)
    sgp.on_step_start(context)
    order = [net[1].weight, net[0].bias, net[0].weight, net[1].bias]  # the optimizer's, not the model's
    logs = sgp.transform_gradients(context, torch.optim.SGD([{"params": order}], lr=0.1))

    generator = step_generator(11, 4)
    torch.rand((), generator=generator)
    xi = torch.randn(sum(p.numel() for p in order), generator=generator)
    by_id = {id(p): g for p, g in zip(net.parameters(), clean, strict=True)}
    offset, noise_sq, grad_sq = 0, 0.0, 0.0
    for param in order:
        g = by_id[id(param)]
        noise = 0.6 * g.pow(2).mean().sqrt() * xi[offset : offset + g.numel()].view_as(g)
        torch.testing.assert_close(param.grad, g + noise)
        offset += g.numel()
        noise_sq += float(noise.pow(2).sum())
        grad_sq += float(g.pow(2).sum())
    assert float(logs["noise_ratio/params"]) == pytest.approx((noise_sq / grad_sq) ** 0.5, rel=1e-4)


# ----------------------------------------------------------------------------------------------- DDP
class PenalisedNet(nn.Module):
    """A network and both L2 penalties as one DDP module (θ are its parameters, as in ReIDModule, and DDP
    ignores them, as ReIDModule tells it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = net_with_every_category()
        self.adaptive = attached(AdaptiveL2(amplitude=A, c=C), self.net)
        self.constant = attached(ConstantL2(lam=0.01), self.net)
        with torch.no_grad():
            for theta, value in zip(self.adaptive.theta, THETAS, strict=False):
                theta.fill_(value)
        ignored = [f"adaptive.{name}" for name in self.adaptive.ddp_ignored_parameters()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).square().mean()

    def transform_gradients(self) -> None:
        for regularizer in (self.adaptive, self.constant):
            regularizer.transform_gradients(StepContext(self.net, loss=None), optimizer=None)


def rank_images(rank: int) -> torch.Tensor:
    return torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(10 + rank))


def ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    results = {}
    for find_unused in (False, True):
        for bucket_view in (False, True):
            module = PenalisedNet()
            ddp = DistributedDataParallel(
                module, find_unused_parameters=find_unused, gradient_as_bucket_view=bucket_view
            )
            for _ in range(2):  # DDP fails in the second step if a parameter's hook did not fire
                ddp.zero_grad(set_to_none=True)
                ddp(rank_images(rank)).backward()
                module.transform_gradients()
            results[find_unused, bucket_view] = {n: p.grad.clone() for n, p in module.named_parameters()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_count_the_penalty_once_on_every_rank(tmp_path):
    """Under DDP (with and without find_unused_parameters and gradient_as_bucket_view) every rank ends with
    mean_r(task gradient of rank r) + the penalties' gradient: the penalties' gradient added after the
    all-reduce, once, neither lost nor averaged away, for the weights and for adaptive L2's θ."""
    world_size = 2
    torch.multiprocessing.spawn(
        ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size
    )
    expected: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        module = PenalisedNet()
        module.net(rank_images(rank)).square().mean().backward()
        for name, p in module.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad / world_size
    penalties = PenalisedNet()  # autograd of the penalties' equations
    (penalties.adaptive.penalty(penalties.net) + penalties.constant.penalty(penalties.net)).backward()
    for name, p in penalties.named_parameters():
        expected[name] = expected.get(name, 0) + p.grad
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for options, grads in results.items():
            assert set(grads) == set(expected), options
            for name, grad in grads.items():
                message = f"find_unused, bucket_view = {options}: {name}"
                torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=message)
