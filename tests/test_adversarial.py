"""Adversarial training and the shared L∞ attacks: budget, ascent, FGSM's closed form, side effects."""

from __future__ import annotations

import csv

import pytest
import torch

from reidreg.attacks import LinfAttack, build_attack
from reidreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reidreg.errors import ConfigError
from reidreg.losses import ReIDLoss
from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext
from reidreg.regularizers.adversarial import AdversarialTraining, choose_per_identity

EPS = 8 / 255
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def tiny_model() -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(ResNetBackbone("test_resnet"), num_classes=4, stripe_channels=16)


def pixel_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images of pixels in [0, 1], with saturated pixels (0 and 1) to exercise the range clamp."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(8, 3, 64, 32, generator=generator)
    pixels[:, :, :8] = 0.0
    pixels[:, :, -8:] = 1.0
    return (pixels - MEAN) / STD, torch.arange(4).repeat_interleave(2)


def fake_module(model: ReIDModel, step: int = 0) -> StepContext:
    return StepContext(model, ReIDLoss(), global_step=step, stage="inputs")


def task_loss_of(model: ReIDModel, labels: torch.Tensor):
    def task_loss(images: torch.Tensor) -> torch.Tensor:
        return ReIDLoss()(model(images), labels)["total"]

    return task_loss


def frozen_loss(model: ReIDModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The task loss in train mode (batch statistics) without touching the running statistics."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        value = float(task_loss_of(model, labels)(images))
    model.load_state_dict(state)
    return value


def test_fgsm_is_the_closed_form_step_within_budget_and_raises_the_loss():
    """FGSM (Goodfellow et al. eq. 3) in pixel space: u_adv = clip_[0,1](u + ε·sign(∇_u J))."""
    model = tiny_model()
    images, labels = pixel_batch()
    pixels = (images * STD + MEAN).requires_grad_(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (grad_u,) = torch.autograd.grad(task_loss_of(model, labels)((pixels - MEAN) / STD), pixels)
    model.load_state_dict(state)
    expected = (pixels.detach() + EPS * grad_u.sign()).clamp(0, 1)

    adversarial = build_attack("fgsm", eps=EPS).perturb(task_loss_of(model, labels), images)
    model.load_state_dict(state)
    adversarial_pixels = adversarial * STD + MEAN
    assert (adversarial_pixels - pixels).abs().max() <= EPS + 1e-6
    assert adversarial_pixels.min() >= -1e-6 and adversarial_pixels.max() <= 1 + 1e-6
    agree = ((adversarial_pixels - expected).abs() < 1e-5).float().mean()
    assert agree > 0.999  # (gradients of ~0 may differ in sign between the two float paths)
    assert frozen_loss(model, adversarial, labels) > frozen_loss(model, images, labels) + 1e-3


def test_pgd_raises_the_loss_at_least_as_much_as_fgsm():
    model = tiny_model()
    images, labels = pixel_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    objective = task_loss_of(model, labels)
    fgsm = build_attack("fgsm", eps=EPS).perturb(objective, images)
    pgd = LinfAttack(eps=EPS, step_size=EPS / 4, steps=10).perturb(objective, images)
    model.load_state_dict(state)
    clean, fgsm_loss, pgd_loss = (frozen_loss(model, x, labels) for x in (images, fgsm, pgd))
    assert pgd_loss >= fgsm_loss > clean
    assert ((pgd - images) * STD).abs().max() <= EPS + 1e-6


def test_zero_budget_returns_the_images_unchanged_and_mask_limits_the_attack():
    model = tiny_model()
    images, labels = pixel_batch()
    objective = task_loss_of(model, labels)
    assert torch.equal(
        LinfAttack(eps=0.0, step_size=0.01, steps=2, random_start=True).perturb(objective, images), images
    )
    mask = torch.tensor([True, False] * 4)
    adversarial = build_attack("fgsm", eps=EPS).perturb(objective, images, mask=mask)
    assert torch.equal(adversarial[~mask], images[~mask])
    assert not torch.equal(adversarial[mask], images[mask])


def test_out_of_range_pixels_never_move_further_out():
    """Random-erasing noise can lie outside [0, 1]: the attack may keep it, never push it further out."""
    images, _ = pixel_batch()
    pixels = images * STD + MEAN
    pixels[:, :, 20:30] = torch.linspace(-0.5, 1.5, 32)  # columns from −0.5 to 1.5
    images = (pixels - MEAN) / STD

    def push_outwards(x: torch.Tensor) -> torch.Tensor:  # gradient −1 on the left half, +1 on the right
        return x[..., 16:].sum() - x[..., :16].sum()

    adversarial = LinfAttack(eps=EPS, step_size=EPS, steps=1).perturb(push_outwards, images) * STD + MEAN
    delta = adversarial - pixels
    outside = (pixels < 0) | (pixels > 1)
    assert outside.any() and delta[outside].abs().max() < 1e-6
    assert delta.abs().max() <= EPS + 1e-6
    assert adversarial[~outside].min() >= -1e-6 and adversarial[~outside].max() <= 1 + 1e-6
    assert (delta[~outside].abs() > EPS / 2).float().mean() > 0.5  # in-range pixels did move


def test_regularizer_leaves_parameter_grads_and_batchnorm_statistics_untouched():
    model = tiny_model()
    images, labels = pixel_batch()
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    regularizer = AdversarialTraining(attack="pgd", eps=EPS, steps=3, adv_fraction=1.0, seed=1)
    adversarial, _, logs = regularizer.transform_inputs(fake_module(model), images, labels)

    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert float(logs["loss_last_iterate"]) > float(logs["loss_first_iterate"])
    assert float(logs["adv_fraction"]) == 1.0
    assert not torch.equal(adversarial, images)
    model(images)  # an ordinary train-mode forward does update them (the check above can fail)
    assert not torch.equal(model.backbone.block1[1].running_mean, buffers["backbone.block1.1.running_mean"])


@pytest.mark.parametrize(("fraction", "per_identity"), [(0.0, 0), (0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_same_share_of_every_identity_is_replaced(fraction, per_identity):
    labels = torch.arange(4).repeat_interleave(4)[
        torch.randperm(16, generator=torch.Generator().manual_seed(0))
    ]
    chosen = choose_per_identity(labels, fraction, torch.Generator().manual_seed(1))
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [per_identity] * 4


def test_mixing_replaces_only_chosen_images_reproducibly():
    model = tiny_model()
    images, labels = pixel_batch()
    regularizer = AdversarialTraining(attack="fgsm", eps=EPS, random_start=False, adv_fraction=0.5, seed=2)
    first, _, logs = regularizer.transform_inputs(fake_module(model, step=7), images, labels)
    changed = (first != images).flatten(1).any(1)
    assert torch.bincount(labels[changed], minlength=4).tolist() == [1, 1, 1, 1]
    assert float(logs["adv_fraction"]) == 0.5
    again, _, _ = regularizer.transform_inputs(fake_module(model, step=7), images, labels)
    assert torch.equal(first, again)
    unchanged, _, logs = AdversarialTraining(adv_fraction=0.0).transform_inputs(
        fake_module(model), images, labels
    )
    assert unchanged is images and logs == {"adv_fraction": 0.0}


def test_attack_defaults_and_errors():
    assert build_attack("fgsm", eps=0.1).step_size == pytest.approx(0.1)
    assert build_attack("fgsm", eps=0.1, random_start=True).step_size == pytest.approx(0.125)
    pgd = build_attack("pgd", eps=0.1, steps=5)
    assert (pgd.steps, pgd.step_size) == (5, pytest.approx(0.05))
    with pytest.raises(ConfigError, match="single step"):
        build_attack("fgsm", eps=0.1, steps=3)
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack("cw", eps=0.1)
    assert not AdversarialTraining.OPTION_RULES["adv_fraction"].accepts(1.5)  # checked before any work


def test_trains_end_to_end_and_logs(tiny_config):
    from reidreg.train import train

    cfg = tiny_config("regularizer=adversarial", "regularizer.adversarial.steps=2")
    results = train(cfg)
    assert 0.0 <= results["test/mAP"] <= 1.0
    with open(f"{cfg.paths.output_dir}/csv/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("reg/adversarial/adv_fraction")]
    assert rows and all(float(r["reg/adversarial/adv_fraction"]) == 0.5 for r in rows)
    assert all(r.get("reg/adversarial/loss_last_iterate") for r in rows)


@pytest.mark.slow
def test_combined_with_sgp_end_to_end(tiny_config):
    from reidreg.train import train

    cfg = tiny_config("regularizer=[adversarial,sgp]", "regularizer.adversarial.attack=fgsm")
    train(cfg)
    with open(f"{cfg.paths.output_dir}/csv/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(r.get("reg/adversarial/adv_fraction") for r in rows)
    assert any(r.get("reg/sgp/noise_ratio/block4") for r in rows)
