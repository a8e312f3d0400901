"""Robustness evaluation: queries attacked in feature space, metrics clean vs attacked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reidreg.attacks import LinfAttack, build_attack
from reidreg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reidreg.errors import ConfigError
from reidreg.evaluation import evaluate
from reidreg.evaluation.robustness import attack_queries, evaluate_robustness, feature_distance
from reidreg.models import ReIDModel, ResNetBackbone

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
NUM_IDS = 8


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


@pytest.fixture(scope="module")
def problem():
    """Every identity is a random image; its query (camera 0) and two gallery images (cameras 1, 2) are
    noisy copies, so the clean ranking is perfect and a drop can only come from the attack. BatchNorm
    running statistics are warmed up on the data so that eval mode is meaningful."""
    generator = torch.Generator().manual_seed(0)
    identities = torch.rand(NUM_IDS, 3, 32, 16, generator=generator)

    def views() -> torch.Tensor:
        return (identities + 0.05 * torch.randn(identities.shape, generator=generator)).clamp(0, 1)

    images = normalise(torch.cat([views(), views(), views()]))
    pids = torch.arange(NUM_IDS).repeat(3)
    camids = torch.arange(3).repeat_interleave(NUM_IDS)
    is_query = camids == 0
    torch.manual_seed(0)
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=4, stripe_channels=16)
    with torch.no_grad():
        for _ in range(5):
            model(images)
    loader = [
        (images[i : i + 8], pids[i : i + 8], camids[i : i + 8], is_query[i : i + 8]) for i in range(0, 24, 8)
    ]
    return model, loader


def test_zero_budget_gives_exactly_the_clean_metrics(problem):
    model, loader = problem
    results = evaluate_robustness(
        model, loader, LinfAttack(eps=0.0, step_size=0.01, steps=2, random_start=True)
    )
    assert results["clean"] == results["attacked"]
    assert set(results["clean"]) == {"mAP", "R1", "R5", "R10", "mINP"}


def test_clean_metrics_are_those_of_the_test_pipeline(problem):
    model, loader = problem
    model.eval()
    images, pids, camids, is_query = (torch.cat(parts) for parts in zip(*loader, strict=True))
    features = model.extract_features(images, flip=True)
    direct = evaluate(
        features[is_query],
        features[~is_query],
        pids[is_query],
        pids[~is_query],
        camids[is_query],
        camids[~is_query],
    )
    model.train()
    results = evaluate_robustness(model, loader, build_attack("fgsm", eps=0.0, random_start=True))
    assert (
        results["clean"]["mAP"] == pytest.approx(direct["mAP"]) and results["clean"]["R1"] == direct["cmc"][0]
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_attack_lowers_map_and_restores_the_model(problem, metric):
    model, loader = problem
    model.train()
    results = evaluate_robustness(
        model, loader, build_attack("pgd", eps=8 / 255, steps=5, random_start=True), metric=metric
    )
    assert results["clean"]["mAP"] == 1.0  # the problem is easy when clean
    assert results["attacked"]["mAP"] < results["clean"]["mAP"]
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_attack_moves_features_further_than_random_noise_of_the_same_budget(problem):
    model, loader = problem
    model.eval()
    queries = loader[0][0]
    attack = build_attack("pgd", eps=4 / 255, steps=5, random_start=True)
    adversarial = attack_queries(model, queries, attack, generator=torch.Generator().manual_seed(0))
    assert ((adversarial - queries) * STD).abs().max() <= 4 / 255 + 1e-6
    signs = torch.randint(0, 2, queries.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    random = normalise((queries * STD + MEAN + 4 / 255 * signs).clamp(0, 1))
    clean = model.extract_features(queries)
    moved_by_attack = feature_distance(model.extract_features(adversarial), clean, metric="cosine")
    moved_by_noise = feature_distance(model.extract_features(random), clean, metric="cosine")
    assert (moved_by_attack > moved_by_noise).all()
    model.train()


def test_feature_distance_definitions():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    torch.testing.assert_close(feature_distance(a, b, metric="cosine"), torch.tensor([1 - 24 / 25, 1.0]))
    torch.testing.assert_close(feature_distance(a, b, metric="euclidean"), torch.tensor([2.0, 5.0]))
    with pytest.raises(ConfigError, match="manhattan"):
        feature_distance(a, b, metric="manhattan")


def test_needs_a_random_start_and_autograd(problem):
    model, loader = problem
    with pytest.raises(ConfigError, match="random_start"):
        evaluate_robustness(model, loader, build_attack("fgsm", eps=8 / 255, random_start=False))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        evaluate_robustness(model, loader, build_attack("fgsm", eps=8 / 255, random_start=True))


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_attack_configs_build(name):
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "attack" / f"{name}.yaml")
    attack = build_attack(**OmegaConf.to_container(config))
    assert attack.eps == pytest.approx(8 / 255, abs=1e-6) and attack.random_start
    assert attack.steps * attack.step_size >= attack.eps  # the steps can reach the boundary of the ball


def test_rerank_applies_to_the_clean_and_the_attacked_queries(problem):
    model, loader = problem
    model.eval()
    images, pids, camids, is_query = (torch.cat(parts) for parts in zip(*loader, strict=True))
    features = model.extract_features(images, flip=True)
    labels = (pids[is_query], pids[~is_query], camids[is_query], camids[~is_query])
    plain = evaluate(features[is_query], features[~is_query], *labels)
    reranked = evaluate(features[is_query], features[~is_query], *labels, rerank=True)
    assert reranked["mAP"] != pytest.approx(plain["mAP"])  # re-ranking changes this problem's ranking
    zero = LinfAttack(eps=0.0, step_size=0.01, steps=1, random_start=True)
    results = evaluate_robustness(model, loader, zero, rerank=True)
    assert results["clean"]["mAP"] == pytest.approx(reranked["mAP"])
    assert results["attacked"] == results["clean"]
