"""Device settings: precision resolution (mocked capabilities), channels-last, fused Adam, compile."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from reidreg.errors import ConfigError
from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers.sgp import SGP
from reidreg.training.device_settings import (
    Capabilities,
    DeviceSettings,
    compile_network,
    prepare_network,
    resolve_device_settings,
    resolve_precision,
    to_channels_last,
    with_fused_adam,
)

HOPPER = Capabilities(cuda=True, bf16=True)
VOLTA = Capabilities(cuda=True, bf16=False)
CPU_ONLY = Capabilities(cuda=False, bf16=False)


@pytest.mark.parametrize(
    ("precision", "accelerator", "capabilities", "expected"),
    [
        ("auto", "auto", HOPPER, "bf16-mixed"),
        ("auto", "gpu", HOPPER, "bf16-mixed"),
        ("auto", "auto", VOLTA, "32"),  # no native bf16: full precision, not fp16 with loss scaling
        ("auto", "auto", CPU_ONLY, "32"),
        ("auto", "cpu", HOPPER, "32"),  # a CPU run on a GPU machine
        ("16-mixed", "auto", HOPPER, "16-mixed"),  # explicit precision wins
        (32, "auto", HOPPER, 32),
        ("bf16-mixed", "cpu", CPU_ONLY, "bf16-mixed"),
    ],
)
def test_resolve_precision(precision, accelerator, capabilities, expected) -> None:
    assert resolve_precision(precision, accelerator=accelerator, capabilities=capabilities) == expected


def test_cpu_settings_change_nothing() -> None:
    settings = resolve_device_settings(capabilities=CPU_ONLY)
    assert settings == DeviceSettings(
        cuda=False,
        precision="32",
        cudnn_benchmark=False,
        channels_last=False,
        pin_memory=False,
        fused_adam=False,
        compile=False,
    )
    assert settings.trainer_kwargs() == {"precision": "32", "benchmark": False}


def test_cuda_settings() -> None:
    settings = resolve_device_settings(capabilities=HOPPER)
    assert settings.cuda and settings.channels_last and settings.pin_memory and settings.fused_adam
    assert settings.trainer_kwargs() == {"precision": "bf16-mixed", "benchmark": True}
    assert not resolve_device_settings(deterministic=True, capabilities=HOPPER).cudnn_benchmark
    # A GradScaler (fp16) unscales inside a fused step, after the regularizers saw the gradients: no fusion.
    assert not resolve_device_settings(precision="16-mixed", capabilities=HOPPER).fused_adam
    assert resolve_device_settings(compile=True, capabilities=HOPPER).compile


def test_gpu_accelerator_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu"):
        resolve_device_settings(accelerator="gpu", capabilities=CPU_ONLY)


def test_fused_adam_only_for_adam_and_only_when_allowed() -> None:
    on_cuda = resolve_device_settings(capabilities=HOPPER)
    on_cpu = resolve_device_settings(capabilities=CPU_ONLY)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    assert with_fused_adam(adam, on_cuda).keywords == {"lr": 1e-3, "fused": True}
    assert with_fused_adam(functools.partial(torch.optim.AdamW), on_cuda).keywords == {"fused": True}
    assert with_fused_adam(adam, on_cpu) is adam
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    assert with_fused_adam(sgd, on_cuda) is sgd
    explicit = functools.partial(torch.optim.Adam, foreach=False)
    assert with_fused_adam(explicit, on_cuda) is explicit


def _model() -> ReIDModel:
    torch.manual_seed(0)
    return ReIDModel(ResNetBackbone("test_resnet"), num_classes=10, stripe_channels=16).train()


def _loss_and_grads(model: ReIDModel, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    outputs = model(images)
    loss = sum(out.logits.square().mean() + out.embedding.sum() for out in outputs.values())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same_gradients(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Equal up to the rounding of another summation order: relative to the scale of all gradients (some
    are mathematically zero, e.g. of biases followed by BatchNorm, and hold rounding noise only)."""
    flat, flat_ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in reference])
    assert float((flat - flat_ref).norm() / flat_ref.norm()) < 1e-4
    scale = float(flat_ref.abs().max())
    for grad, ref_grad in zip(grads, reference, strict=True):
        assert float((grad - ref_grad).abs().max()) <= 1e-4 * scale


def test_channels_last_network_computes_the_same_function() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    parameters_before = [id(p) for p in model.parameters()]
    forced = resolve_device_settings(capabilities=HOPPER)  # channels_last on, compile off
    prepare_network(model, forced)
    assert [id(p) for p in model.parameters()] == parameters_before  # hooks/regularizers keep their tensors
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = torch.randn(8, 3, 64, 32)
    loss, grads = _loss_and_grads(model, to_channels_last(images, forced))
    ref_loss, ref_grads = _loss_and_grads(reference, images)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert_same_gradients(grads, ref_grads)
    assert prepare_network(model, resolve_device_settings(capabilities=CPU_ONLY)) is model


def test_compile_refuses_forward_hooks_on_the_network() -> None:
    model = _model()

    class Host(torch.nn.Module):  # what SGP.attach reads from the Lightning module
        def __init__(self, network: ReIDModel) -> None:
            super().__init__()
            self.model = network

    SGP(sigma=1.0, sites=["block4"]).attach(Host(model))
    with pytest.raises(ConfigError, match=r"model\.compile=true.*backbone\.block4"):
        compile_network(model)
    assert "forward" not in vars(model)  # nothing was compiled


@pytest.mark.slow
def test_compiled_network_matches_eager() -> None:
    """torch.compile of the whole forward (inductor on the CPU: minutes on a busy 2-core machine): same
    loss and gradients as eager in training, same features through ``extract_features`` in eval mode."""
    eager, compiled = _model(), _model()
    compile_network(compiled)
    images = torch.randn(8, 3, 64, 32)
    loss, grads = _loss_and_grads(compiled, images)
    ref_loss, ref_grads = _loss_and_grads(eager, images)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert_same_gradients(grads, ref_grads)
    torch.testing.assert_close(
        compiled.eval().extract_features(images), eager.eval().extract_features(images), rtol=1e-4, atol=1e-4
    )
