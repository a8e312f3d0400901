"""SGP (our reading, docs/methods/sgp.md): g̃ = g + σ·rms(g)·ξ at the configured sites, with prob. p."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from reidreg.attacks import build_attack
from reidreg.errors import ConfigError
from reidreg.losses import ReIDLoss
from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext
from reidreg.regularizers.random_streams import step_generator
from reidreg.regularizers.sgp import SGP, SITES

SEED = 3


def tiny_model(*, regional: bool = True) -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(
        ResNetBackbone("test_resnet"), num_classes=4, stripe_channels=16, regional_branches=regional
    )


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 64, 32, generator=generator), torch.arange(4).repeat_interleave(2)


def fake_module(model: ReIDModel, step: int = 0, stage: str = "task") -> StepContext:
    """The step context SGP reads (the network, the global step, the step's stage); also what attach uses."""
    return StepContext(model, ReIDLoss(), global_step=step, stage=stage)


def stage(model: ReIDModel, site: str) -> torch.nn.Module:
    return model.regional_block5 if site == "regional_block5" else getattr(model.backbone, site)


class StageSpy:
    """Records every stage's output and, optionally, the gradient it finally receives."""

    def __init__(self, model: ReIDModel, *, grads: bool = True) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [stage(model, site).register_forward_hook(self._hook(site, grads)) for site in SITES]

    def _hook(self, site: str, grads: bool):
        def forward_hook(_module, _inputs, output):
            self.outputs[site] = output
            if grads and output.requires_grad:
                output.register_hook(lambda grad: self.grads.__setitem__(site, grad.detach().clone()))

        return forward_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def backward(model: ReIDModel, images: torch.Tensor, labels: torch.Tensor, *, scale: float = 1.0) -> None:
    (ReIDLoss()(model(images), labels)["total"] * scale).backward()


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double().pow(2).mean().sqrt()


def expected_xi(seed: int, step: int, shape: torch.Size) -> torch.Tensor:
    """ξ of the first application in a step: the generator of (seed, step) after the draw for p."""
    generator = step_generator(seed, step)
    torch.rand((), generator=generator)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_feature_noise_is_sigma_times_gradient_rms(sigma):
    model = tiny_model()
    images, labels = batch()
    before = StageSpy(model)  # registered first: sees the gradient SGP receives
    sgp = SGP(sigma=sigma, sites=["block4"], seed=SEED)
    module = fake_module(model, step=5)
    sgp.attach(module)
    after = StageSpy(model)  # registered after SGP: sees the perturbed gradient
    sgp.on_step_start(module)
    backward(model, images, labels)
    g, perturbed = before.grads["block4"], after.grads["block4"]
    noise = perturbed - g

    # The equation, evaluated directly: the same ξ, scaled by σ·rms(g) over the whole tensor.
    torch.testing.assert_close(
        noise, sigma * rms(g).float() * expected_xi(SEED, 5, g.shape), rtol=1e-4, atol=1e-9
    )
    # And its statistics: zero mean, RMS ratio σ (12,288 entries: ~1% sampling error).
    assert abs(noise.double().mean()) < 5 * sigma * rms(g) / g.numel() ** 0.5
    assert rms(noise) / rms(g) == pytest.approx(sigma, rel=0.05)
    logs = sgp.transform_gradients(module, torch.optim.SGD(model.parameters(), lr=0.1))
    assert logs["active"] == 1.0
    assert float(logs["noise_ratio/block4"]) == pytest.approx(float(rms(noise) / rms(g)), rel=1e-4)
    assert set(logs) == {"active", "noise_ratio/block4"}


def test_per_sample_rms_scales_each_sample_by_its_own_gradient():
    model = tiny_model()
    images, labels = batch()
    before = StageSpy(model)
    sgp = SGP(sigma=0.5, sites=["block4"], rms_over="sample", seed=SEED)
    module = fake_module(model, step=2)
    sgp.attach(module)
    after = StageSpy(model)
    sgp.on_step_start(module)
    backward(model, images, labels)
    g = before.grads["block4"]
    noise = after.grads["block4"] - g
    per_sample_rms = g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(
        noise, 0.5 * per_sample_rms * expected_xi(SEED, 2, g.shape), rtol=1e-4, atol=1e-9
    )
    ratios = noise.pow(2).mean(dim=(1, 2, 3)).sqrt() / per_sample_rms.flatten()
    assert torch.allclose(ratios, torch.full_like(ratios, 0.5), rtol=0.12)


def test_noise_enters_only_at_the_configured_sites():
    """Each stage's gradient equals the back-propagation of the gradients downstream of it, except at a
    site, where it differs by noise of RMS ratio σ. The blocks feeding the heads compare to a clean run."""
    sites = ["block2", "regional_block5"]
    model = tiny_model()
    images, labels = batch()
    reference = StageSpy(model)
    backward(model, images, labels)
    reference.remove()
    sgp = SGP(sigma=0.7, sites=sites, seed=SEED)
    module = fake_module(model)
    sgp.attach(module)
    observed = StageSpy(model)
    sgp.on_step_start(module)
    backward(model, images, labels)
    observed.remove()
    sgp.remove_hooks()

    torch.testing.assert_close(observed.grads["block5"], reference.grads["block5"])
    regional_noise = observed.grads["regional_block5"] - reference.grads["regional_block5"]
    assert rms(regional_noise) / rms(reference.grads["regional_block5"]) == pytest.approx(0.7, rel=0.1)

    fresh = StageSpy(model, grads=False)  # the same function, in a graph without hooks
    model(images)
    out = fresh.outputs
    downstream = {
        "block1": ["block2"],
        "block2": ["block3"],
        "block3": ["block4"],
        "block4": ["block5", "regional_block5"],
    }
    for site, consumers in downstream.items():
        (propagated,) = torch.autograd.grad(
            [out[c] for c in consumers], out[site], [observed.grads[c] for c in consumers], retain_graph=True
        )
        if site in sites:
            assert rms(observed.grads[site] - propagated) / rms(propagated) == pytest.approx(0.7, rel=0.1)
        else:
            torch.testing.assert_close(observed.grads[site], propagated, rtol=1e-4, atol=1e-9, msg=site)


def test_eval_mode_draw_off_and_removed_hooks_leave_gradients_exact():
    model = tiny_model()
    images, labels = batch()
    reference = StageSpy(model)
    backward(model, images, labels)
    clean = {site: grad.clone() for site, grad in reference.grads.items()}
    reference.remove()
    hooks_before = len(model.backbone.block4._forward_hooks)

    def grads_with(sgp: SGP, *, train: bool) -> dict[str, torch.Tensor]:
        spy = StageSpy(model)
        model.train(train)
        model.zero_grad()
        backward(model, images, labels)
        spy.remove()
        model.train()
        return spy.grads

    on = SGP(sigma=1.0, p=1.0, sites=["block4"], seed=SEED)
    module = fake_module(model)
    on.attach(module)
    on.on_step_start(module)
    assert on.transform_gradients(module, torch.optim.SGD(model.parameters(), lr=0.1))["active"] == 1.0
    assert not torch.equal(grads_with(on, train=True)["block3"], clean["block3"])  # the test can fail
    eval_grads = grads_with(on, train=False)  # eval mode: no perturbation (BN differs, so compare ratios)
    on.remove_hooks()
    torch.testing.assert_close(eval_grads, grads_with(on, train=False))
    assert len(model.backbone.block4._forward_hooks) == hooks_before
    for site, grad in grads_with(on, train=True).items():  # removed: exact again
        torch.testing.assert_close(grad, clean[site], msg=site)

    off = SGP(sigma=1.0, p=0.0, sites=["block4"], seed=SEED)
    off.attach(module)
    off.on_step_start(module)
    for site, grad in grads_with(off, train=True).items():
        torch.testing.assert_close(grad, clean[site], msg=site)
    assert off.transform_gradients(module, torch.optim.SGD(model.parameters(), lr=0.1)) == {"active": 0.0}


def test_probability_p_per_step_and_reproducible_draws():
    model = tiny_model()

    def draws(p: float, seed: int) -> list[bool]:
        sgp = SGP(sigma=1.0, p=p, sites=["block4"], seed=seed)
        result = []
        for step in range(400):
            sgp.on_step_start(fake_module(model, step))
            result.append(sgp._active)
        return result

    assert not any(draws(0.0, 1)) and all(draws(1.0, 1))
    frequency = sum(draws(0.3, 1)) / 400
    assert abs(frequency - 0.3) < 4 * (0.3 * 0.7 / 400) ** 0.5
    assert draws(0.3, 1) == draws(0.3, 1)  # resume-exact: a function of (seed, step)
    assert draws(0.3, 1) != draws(0.3, 2)


def test_parameter_gradient_noise_after_backward_network_only():
    model = tiny_model()
    images, labels = batch()
    extra = torch.nn.Parameter(torch.ones(3))  # e.g. a regularizer's own parameter, in the same optimizer
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    backward(model, images, labels)
    extra.grad = torch.full((3,), 0.25)
    clean = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    sgp = SGP(sigma=0.4, sites=[], param_grads=True, seed=SEED)
    module = fake_module(model, step=9)
    sgp.attach(module)
    sgp.on_step_start(module)
    logs = sgp.transform_gradients(module, optimizer)

    generator = step_generator(SEED, 9)
    torch.rand((), generator=generator)
    noise_sq = grad_sq = 0.0
    for name, param in model.named_parameters():  # optimizer order = model.parameters() order
        if name not in clean:
            continue
        g = clean[name]
        expected = g + 0.4 * g.pow(2).mean().sqrt() * torch.randn(g.shape, generator=generator)
        torch.testing.assert_close(param.grad, expected, msg=name)
        noise_sq += float((param.grad - g).pow(2).sum())
        grad_sq += float(g.pow(2).sum())
        if g.numel() > 5000 and g.abs().sum() > 0:
            assert rms(param.grad - g) / rms(g) == pytest.approx(0.4, rel=0.1), name
    assert torch.equal(extra.grad, torch.full((3,), 0.25))
    assert float(logs["noise_ratio/params"]) == pytest.approx((noise_sq / grad_sq) ** 0.5, rel=1e-4)


def train_steps(sgp: SGP | None, steps: int = 2) -> dict[str, torch.Tensor]:
    """A few Adam steps of the standard step's order of hooks on a fixed tiny problem."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if sgp is not None:
        sgp.attach(fake_module(model))
    for step in range(steps):
        module = fake_module(model, step)
        images, labels = batch(step)
        if sgp is not None:
            sgp.on_step_start(module)
        optimizer.zero_grad()
        backward(model, images, labels)
        if sgp is not None:
            sgp.transform_gradients(module, optimizer)
        optimizer.step()
    return copy.deepcopy(model.state_dict())


def test_sigma_zero_trains_exactly_like_no_regularizer():
    everything = {"sites": list(SITES), "param_grads": True, "seed": SEED}
    baseline = train_steps(None)
    zero = train_steps(SGP(sigma=0.0, **everything))
    noisy = train_steps(SGP(sigma=0.5, **everything))
    assert all(torch.equal(zero[k], baseline[k]) for k in baseline)
    assert not all(torch.equal(noisy[k], baseline[k]) for k in baseline)
    again = train_steps(SGP(sigma=0.5, **everything))
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)


def test_loss_scaling_cancels_exactly():
    """The 16-mixed argument: with the loss scaled by s (GradScaler), the hooks see s·g and add s·σ·rms(g)·ξ;
    unscaling gives exactly the unscaled perturbation (s a power of two: exact in floating point)."""

    def perturbed_grads(scale: float) -> dict[str, torch.Tensor]:
        model = tiny_model()
        images, labels = batch()
        sgp = SGP(sigma=0.5, sites=["block2", "block4"], param_grads=True, seed=SEED)
        module = fake_module(model, step=4)
        sgp.attach(module)
        sgp.on_step_start(module)
        backward(model, images, labels, scale=scale)
        for param in model.parameters():  # what GradScaler.unscale_ does before on_before_optimizer_step
            if param.grad is not None:
                param.grad.div_(scale)
        sgp.transform_gradients(module, torch.optim.SGD(model.parameters(), lr=0.1))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    unscaled, scaled = perturbed_grads(1.0), perturbed_grads(2.0**12)
    assert all(torch.equal(unscaled[name], scaled[name]) for name in unscaled)


def test_bfloat16_autocast_gradients_get_relative_noise():
    model = tiny_model()
    images, labels = batch()
    before = StageSpy(model)
    sgp = SGP(sigma=0.5, sites=["block4"], seed=SEED)
    module = fake_module(model)
    sgp.attach(module)
    after = StageSpy(model)
    sgp.on_step_start(module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ReIDLoss()(model(images), labels)["total"]
    loss.backward()
    g, perturbed = before.grads["block4"], after.grads["block4"]
    assert g.dtype == perturbed.dtype == torch.bfloat16
    assert rms(perturbed.float() - g.float()) / rms(g.float()) == pytest.approx(0.5, rel=0.05)


def test_float16_gradscaler_path_matches_float32():
    """16-mixed mechanics on CPU: fp16 autocast, GradScaler-scaled backward through the feature hooks,
    unscale_, then parameter noise. The perturbed update direction matches the fp32 run (same noise)."""

    def run(precision: torch.dtype | None) -> torch.Tensor:
        model = tiny_model()
        images, labels = batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sgp = SGP(sigma=0.5, sites=["block4"], param_grads=True, seed=SEED)
        module = fake_module(model)
        sgp.attach(module)
        sgp.on_step_start(module)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, enabled=precision is not None)
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            loss = ReIDLoss()(model(images), labels)["total"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        logs = sgp.transform_gradients(module, optimizer)
        assert float(logs["noise_ratio/block4"]) == pytest.approx(0.5, rel=0.05)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full, half = run(None), run(torch.float16)
    assert torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(full, half, dim=0) > 0.99


def test_attack_gradients_are_not_perturbed():
    model = tiny_model()
    images, labels = batch()
    sgp = SGP(sigma=1.0, sites=["block4"], seed=SEED)
    module = fake_module(model, stage="inputs")  # an input transform's passes, as adversarial training's
    sgp.attach(module)
    sgp.on_step_start(module)
    attack = build_attack("fgsm", eps=4 / 255)

    def task_loss(x: torch.Tensor) -> torch.Tensor:
        return ReIDLoss()(model(x), labels)["total"]

    adversarial = attack.perturb(task_loss, images)
    assert "noise_ratio/block4" not in sgp.transform_gradients(module, torch.optim.SGD(model.parameters()))
    sgp.remove_hooks()
    torch.testing.assert_close(adversarial, attack.perturb(task_loss, images))


def test_invalid_options_are_clear_errors():
    assert not SGP.OPTION_RULES["sites"].accepts(["block6"])  # checked before any work by reidreg.options
    with pytest.raises(ConfigError, match="perturbs nothing"):
        SGP(sites=[], param_grads=False)
    with pytest.raises(ConfigError, match="regional_block5"):
        SGP(sites=["regional_block5"]).attach(fake_module(tiny_model(regional=False)))


def read_metrics(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_trains_end_to_end_and_logs(tiny_config):
    from reidreg.train import train

    cfg = tiny_config(
        "regularizer=sgp",
        "regularizer.sgp.sigma=0.5",
        "regularizer.sgp.sites=[block3,regional_block5]",
        "regularizer.sgp.param_grads=true",
    )
    results = train(cfg)
    assert 0.0 <= results["test/mAP"] <= 1.0
    rows = read_metrics(f"{cfg.paths.output_dir}/csv/metrics.csv")
    active = [float(r["reg/sgp/active"]) for r in rows if r.get("reg/sgp/active")]
    assert active and set(active) == {1.0}
    for site in ("block3", "regional_block5", "params"):
        ratios = [
            float(r[f"reg/sgp/noise_ratio/{site}"]) for r in rows if r.get(f"reg/sgp/noise_ratio/{site}")
        ]
        assert len(ratios) == len(active)
        assert all(r == pytest.approx(0.5, rel=0.15) for r in ratios), (site, ratios)


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_config):
    """The noise of step t depends on (seed, t) only: resuming after epoch 1 ends as if uninterrupted."""
    from reidreg.train import train

    common = (
        "regularizer=sgp",
        "regularizer.sgp.p=0.5",
        "regularizer.sgp.sites=[block2,block4]",
        "regularizer.sgp.param_grads=true",
        "test=false",
    )
    train(tiny_config(*common, f"paths.output_dir={tmp_path / 'a'}"))
    train(tiny_config(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'b'}"))
    checkpoint = tmp_path / "b" / "checkpoints" / "last.ckpt"
    train(tiny_config(*common, f"ckpt_path={checkpoint}", f"paths.output_dir={tmp_path / 'c'}"))

    def weights(run: str) -> dict[str, torch.Tensor]:
        return torch.load(
            tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )["state_dict"]

    uninterrupted, resumed = weights("a"), weights("c")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_trains_end_to_end_in_bf16_mixed_precision(tiny_config):
    from reidreg.train import train

    cfg = tiny_config("regularizer=sgp", "regularizer.sgp.param_grads=true", "trainer.precision=bf16-mixed")
    train(cfg)
    rows = read_metrics(f"{cfg.paths.output_dir}/csv/metrics.csv")
    ratios = [float(r["reg/sgp/noise_ratio/block4"]) for r in rows if r.get("reg/sgp/noise_ratio/block4")]
    assert ratios and all(r == pytest.approx(1.0, rel=0.15) for r in ratios)
