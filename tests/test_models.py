"""Backbone surgery, pretrained-weight handling, objective modules and the full model's shapes."""

import pytest
import timm
import torch
from torch import nn

from reidreg.models import BackboneError, ObjectiveModule, ReIDModel, ResNetBackbone


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


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(BackboneError, match="nope.pth"):
        ResNetBackbone("test_resnet", pretrained=True, weights_file=str(tmp_path / "nope.pth"))


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
