"""Adversarial robustness of retrieval: mAP and CMC when the query images are attacked.

SGP's second claim (Zhou et al., "Stochastic Gradient Perturbation", IEEE TCSVT 2023, abstract;
docs/methods/sgp.md) is that it keeps adversarial robustness while improving generalisation, and
adversarial training (AT) trades one for the other. This measures it: every query
image is attacked white-box, within an L∞ ball of radius ε in [0, 1] pixel space (``reidreg.attacks``), so
that its retrieval feature f moves as far as possible from its clean feature,

    max_{‖δ‖∞ ≤ ε}  d(f(x + δ), f(x)),    d = 1 − cos  (metric "cosine")  or  ‖·‖²  (metric "euclidean"),

with f(x) detached and f the deployed retrieval feature (concatenated embeddings, averaged with the
flipped image's when ``flip``). This is the untargeted feature-space attack used against ReID models
(e.g. Bai et al., "Adversarial metric attack and defense for person re-identification", TPAMI 2021); it
needs no labels and attacks the ranking directly. The gallery stays clean. Both the clean and the attacked
queries are evaluated against the same gallery with ``reidreg.evaluation.evaluate``, both with or both
without k-reciprocal re-ranking (``rerank``), so that the clean table is the test table and the two compare.

d has a zero gradient at δ = 0 (it is a minimum there), so the attack must start from a random point of
the ball (``random_start``); the start is drawn from a generator seeded by ``seed``, so the evaluation is
deterministic. The network is evaluated in eval mode (BatchNorm running statistics, as at test time).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from reidreg.attacks import LinfAttack
from reidreg.errors import ConfigError
from reidreg.evaluation.distance import evaluate
from reidreg.models import ReIDModel

REPORTED_METRICS = ("mAP", "R1", "R5", "R10", "mINP")


def feature_distance(features: torch.Tensor, reference: torch.Tensor, *, metric: str) -> torch.Tensor:
    """Per-sample distance of the evaluation ``metric``: 1 − cos, or the squared Euclidean distance."""
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(features, reference, dim=1)
    if metric == "euclidean":
        return (features - reference).pow(2).sum(dim=1)
    raise ConfigError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")


def attack_queries(
    model: ReIDModel,
    images: torch.Tensor,
    attack: LinfAttack,
    *,
    metric: str = "cosine",
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial versions of normalised query ``images`` that push their features from the clean ones.

    The model should be in eval mode (then the samples are independent and the summed distance gives
    every sample its own gradient).
    """
    with torch.no_grad():
        clean = model.retrieval_features(images, flip=flip)

    def distance_from_clean(candidate: torch.Tensor) -> torch.Tensor:
        return feature_distance(model.retrieval_features(candidate, flip=flip), clean, metric=metric).sum()

    return attack.perturb(distance_from_clean, images, generator=generator)


def evaluate_robustness(
    model: ReIDModel,
    loader: Iterable,
    attack: LinfAttack,
    *,
    metric: str = "cosine",
    flip: bool = True,
    max_rank: int = 50,
    seed: int = 0,
    rerank: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics with clean and with attacked queries: ``{"clean": {...}, "attacked": {...}}``.

    ``loader`` yields ``(images, pids, camids, is_query[, positions])`` batches of normalised query and
    gallery images (the datamodule's ``test_dataloader()``, whose ``positions`` give the canonical order the
    features are sorted back into); only the query images are attacked. Each inner dict has
    ``mAP``, ``R1``, ``R5``, ``R10`` and ``mINP``, both re-ranked when ``rerank``. Runs on the model's
    device, in eval mode (the previous mode is restored), and needs autograd: call it outside
    ``torch.inference_mode()``.
    """
    if attack.eps > 0 and not attack.random_start:
        raise ConfigError(
            "the query attack needs random_start=true: the distance to the clean feature has zero gradient "
            "at the clean image, so an attack without a random start would not move"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("evaluate_robustness needs autograd: call it outside torch.inference_mode()")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    features: dict[str, list[torch.Tensor]] = {"gallery": [], "clean": [], "attacked": []}
    labels: dict[str, list[torch.Tensor]] = {"g_pids": [], "g_camids": [], "q_pids": [], "q_camids": []}
    positions: dict[str, list[torch.Tensor]] = {"g": [], "q": []}
    was_training = model.training
    model.eval()
    try:
        for images, pids, camids, is_query, *position in loader:
            images = images.to(device)
            is_query = torch.as_tensor(is_query, dtype=torch.bool)
            pids, camids = torch.as_tensor(pids), torch.as_tensor(camids)
            if position:
                positions["g"].append(position[0][~is_query])
                positions["q"].append(position[0][is_query])
            clean = model.extract_features(images, flip=flip).cpu()
            features["gallery"].append(clean[~is_query])
            labels["g_pids"].append(pids[~is_query])
            labels["g_camids"].append(camids[~is_query])
            if bool(is_query.any()):
                queries = images[is_query.to(device)]
                adversarial = attack_queries(
                    model, queries, attack, metric=metric, flip=flip, generator=generator
                )
                features["clean"].append(clean[is_query])
                features["attacked"].append(model.extract_features(adversarial, flip=flip).cpu())
                labels["q_pids"].append(pids[is_query])
                labels["q_camids"].append(camids[is_query])
    finally:
        model.train(was_training)

    gallery = torch.cat(features["gallery"])
    label_tensors = {name: torch.cat(values) for name, values in labels.items()}
    if positions["g"]:  # back to the canonical order, so that ties rank as in `evaluate`
        g_order, q_order = (torch.cat(positions[side]).argsort() for side in ("g", "q"))
        gallery = gallery[g_order]
        for kind in ("clean", "attacked"):
            features[kind] = [torch.cat(features[kind])[q_order]]
        for name in label_tensors:
            label_tensors[name] = label_tensors[name][g_order if name.startswith("g") else q_order]
    return {
        kind: _summary(
            evaluate(
                torch.cat(features[kind]),
                gallery,
                label_tensors["q_pids"],
                label_tensors["g_pids"],
                label_tensors["q_camids"],
                label_tensors["g_camids"],
                metric=metric,
                max_rank=max_rank,
                rerank=rerank,
            )
        )
        for kind in ("clean", "attacked")
    }


def _summary(results: dict) -> dict[str, float]:
    """mAP, mINP and R1/R5/R10 (those within ``max_rank``) as floats."""
    cmc = results["cmc"]
    summary = {"mAP": float(results["mAP"]), "mINP": float(results["mINP"])}
    summary.update({f"R{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)})
    return {key: summary[key] for key in REPORTED_METRICS if key in summary}
