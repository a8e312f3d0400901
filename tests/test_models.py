"""Backbone surgery, pretrained-weight handling, objective modules and the full model's shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from reidreg.models import BackboneError, ObjectiveModule, ReIDModel, ResNetBackbone

REPO = Path(__file__).resolve().parents[1]


def test_last_stride_one_doubles_block5_resolution_without_dilation():
    reference = timm.create_model("resnet18", pretrained=False)
    backbone = ResNetBackbone("resnet18", last_stride_one=True)
    images = torch.randn(2, 3, 64, 32)
    assert reference.forward_features(images).shape[-2:] == (2, 1)
    assert backbone(images).shape[-2:] == (4, 2)
    convs = [m for m in backbone.block5.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.stride == (1, 1) and m.dilation == (1, 1) for m in convs)


def test_last_stride_one_handles_resnet_d_average_pool():
    backbone = ResNetBackbone("test_resnet", last_stride_one=True)
    assert not any(isinstance(m, nn.AvgPool2d) for m in backbone.block5.modules())
    assert backbone(torch.randn(1, 3, 64, 32)).shape[-2:] == (4, 2)


def test_blocks_one_to_five_compose_to_the_backbone():
    backbone = ResNetBackbone("test_resnet").eval()
    x = torch.randn(1, 3, 64, 32)
    y = x
    for block in backbone.blocks:
        y = block(y)
    assert len(backbone.blocks) == 5
    torch.testing.assert_close(y, backbone(x))


def test_weights_file_is_loaded(tmp_path):
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = ResNetBackbone("test_resnet", pretrained=True, weights_file=str(path))
    torch.testing.assert_close(backbone.block2[0].conv1.weight, source.layer1[0].conv1.weight)


def test_pretrained_without_file_offline_fails_at_once_with_instructions():
    with pytest.raises(BackboneError, match="weights_file"):
        ResNetBackbone("resnet50.tv_in1k", pretrained=True)


def test_missing_weights_file_says_how_to_get_it(tmp_path):
    target = tmp_path / "pretrained" / "resnet50.tv_in1k.safetensors"
    with pytest.raises(BackboneError) as caught:
        ResNetBackbone("resnet50.tv_in1k", pretrained=True, weights_file=str(target))
    message = str(caught.value)
    assert "\n" not in message and str(target) in message
    assert (
        "backbone.allow_download=true" in message
        and "https://huggingface.co/timm/resnet50.tv_in1k" in message
    )
    assert "backbone.pretrained=false" in message
    assert not target.parent.exists()


@pytest.fixture
def no_network(monkeypatch):
    """This machine's and CI's situation: huggingface_hub's HTTP transport, the lowest level of every Hub
    request (timm's downloads included), fails as a failed DNS lookup does. Returns the calls it refused."""
    import httpx2
    from huggingface_hub import constants

    refused = []

    def offline(self, request):
        refused.append(str(request.url))
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    monkeypatch.setattr(httpx2.HTTPTransport, "handle_request", offline)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return refused


def test_download_without_network_is_one_line_naming_where_to_put_the_file(tmp_path, no_network):
    target = tmp_path / "data" / "pretrained" / "resnet18.tv_in1k.safetensors"
    with pytest.raises(BackboneError) as caught:
        ResNetBackbone("resnet18.tv_in1k", pretrained=True, weights_file=str(target), allow_download=True)
    message = str(caught.value)
    assert no_network, "the download did not even try the network"
    assert "\n" not in message
    assert (
        "downloading the resnet18.tv_in1k weights from https://huggingface.co/timm/resnet18.tv_in1k"
        in message
    )
    assert "failed (ConnectError: [Errno -2] Name or service not known)" in message
    assert f"put the file at {target}" in message
    assert not (tmp_path / "data").exists()  # a failed download leaves nothing behind


def _hub_cache_with(cache: Path, repo: str, state_dict: dict[str, torch.Tensor]) -> None:
    """A Hugging Face cache holding ``repo``'s model.safetensors, as an earlier download leaves it."""
    import safetensors.torch

    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(state_dict, folder / "snapshots" / commit / "model.safetensors")


def test_download_in_hub_offline_mode_goes_through_timm_and_fails_in_one_line(
    tmp_path, monkeypatch, no_network
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: the Hub cache only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    target = tmp_path / "pretrained" / "test_resnet.r160_in1k.safetensors"
    with pytest.raises(BackboneError) as caught:
        ResNetBackbone(
            "test_resnet.r160_in1k", pretrained=True, weights_file=str(target), allow_download=True
        )
    message = str(caught.value)
    assert "\n" not in message and "failed (" in message and f"put the file at {target}" in message
    assert not no_network and not target.parent.exists()


def test_download_writes_the_default_weights_file_and_says_so(tmp_path, monkeypatch, caplog, no_network):
    """allow_download=true: timm fetches the weights (here from the Hub cache: no network in tests) and they
    land in weights_file, whose folder is created; the next run reads that file."""
    from huggingface_hub import constants

    source = timm.create_model("test_resnet", pretrained=False).state_dict()
    _hub_cache_with(tmp_path / "hub", "timm/test_resnet.r160_in1k", source)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    target = tmp_path / "data" / "pretrained" / "test_resnet.r160_in1k.safetensors"
    with caplog.at_level("INFO", logger="reidreg.models.pretrained"):
        backbone = ResNetBackbone(
            "test_resnet.r160_in1k", pretrained=True, weights_file=str(target), allow_download=True
        )
    assert target.is_file()
    lines = [r.getMessage() for r in caplog.records if r.name == "reidreg.models.pretrained"]
    assert len(lines) == 1
    assert (
        "downloaded test_resnet.r160_in1k from https://huggingface.co/timm/test_resnet.r160_in1k" in lines[0]
    )
    assert f"to {target} (" in lines[0]
    torch.testing.assert_close(backbone.block2[0].conv1.weight, source["layer1.0.conv1.weight"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "gone"))  # the file alone suffices now
    again = ResNetBackbone("test_resnet.r160_in1k", pretrained=True, weights_file=str(target))
    torch.testing.assert_close(again.block2[0].conv1.weight, source["layer1.0.conv1.weight"])


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="resnet51"):
        ResNetBackbone("resnet51")


def test_rbr_removes_last_bn_and_activations():
    backbone = ResNetBackbone("resnet50", rbr=True)
    last = backbone.block5[-1]
    assert backbone.rbr_removed == ["2.bn3", "2.act1", "2.act2", "2.act3"]
    assert all(isinstance(getattr(last, n), nn.Identity) for n in ("bn3", "act1", "act2", "act3"))
    assert isinstance(backbone.block5[-2].bn3, nn.BatchNorm2d)


def test_objective_module_clips_before_bn_and_classifier_has_no_bias():
    head = ObjectiveModule(8, 5)
    out = head(torch.randn(4, 8, 3, 3) * 10)
    assert out.embedding.min() >= 0 and out.embedding.max() <= 1
    assert head.classifier.bias is None
    assert out.logits.shape == (4, 5)
    assert abs(head.classifier.weight.std().item() - 0.001) < 0.0005


def test_model_heads_and_embedding_dim():
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=7, stripe_channels=16)
    outputs = model(torch.randn(2, 3, 64, 32))
    assert list(outputs) == ["global", "stripe1", "stripe2"]
    assert model.embedding_dim == model.backbone.num_features + 32
    model.eval()
    features = model.extract_features(torch.randn(3, 3, 64, 32))
    assert features.shape == (3, model.embedding_dim)
    # The regional block 5 is a copy, not shared.
    assert model.regional_block5 is not model.backbone.block5
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(model.regional_block5.parameters(), model.backbone.block5.parameters(), strict=True)
    )


def test_flip_averaged_features_are_flip_invariant():
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=3, regional_branches=False).eval()
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(model.extract_features(images), model.extract_features(images.flip(3)))


def test_train_command_offline_with_allow_download_prints_one_error_line(tmp_path):
    """The command as typed, with huggingface_hub offline (no network in tests): one line, no traceback."""
    from tests.conftest import TINY_OVERRIDES

    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        *[o for o in TINY_OVERRIDES if not o.startswith("backbone=")],
        "backbone=resnet18",
        "backbone.allow_download=true",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    target = tmp_path / "data" / "pretrained" / "resnet18.tv_in1k.safetensors"
    assert len(errors) == 1 and "downloading the resnet18.tv_in1k weights" in errors[0], done.stderr
    assert "failed (" in errors[0] and f"put the file at {target}" in errors[0]
