"""SGSL (eqs. (6)–(7) of the SGSL paper, AAAI 2023): values against explicit loops over classes, the
stop-gradient, the CE gate, γ/β behaviour, AMP, the config, and end-to-end runs (alone, with adaptive L2,
with RBR)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from reidreg.errors import ConfigError
from reidreg.losses import ReIDLoss
from reidreg.models import HeadOutput, ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext, TrainStep, build_regularizers
from reidreg.regularizers.sgsl import SGSL, stop_gradient_softmax_loss
from tests.host_reads import HostReads

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ADAPTIVE_L2_YAML = CONF_DIR / "regularizer" / "adaptive_l2.yaml"

# Hand-made example: 3 samples, 4 classes, 3-d features (arbitrary norms, not normalised).
FEATURES = [[1.0, 2.0, -0.5], [-1.5, 0.3, 0.8], [0.2, -0.7, 2.0]]
CLASS_WEIGHTS = [[0.5, 1.0, 0.0], [-2.0, 0.1, 0.3], [0.0, -0.4, 1.5], [1.0, 1.0, 1.0]]
LABELS = [0, 1, 3]


def eq6_reference(features, class_weights, labels, gamma: float) -> float:
    """Eq. (6) of the SGSL paper termwise: mean_i softplus((1/γ) log Σ_{j≠y_i} exp(γ cos_ij) − cos_iy_i)."""
    total = 0.0
    for feature, label in zip(features, labels, strict=True):
        cosines = []
        for weight in class_weights:
            dot = sum(f * w for f, w in zip(feature, weight, strict=True))
            norms = math.sqrt(sum(f * f for f in feature)) * math.sqrt(sum(w * w for w in weight))
            cosines.append(dot / norms)
        negatives = [cosines[j] for j in range(len(class_weights)) if j != label]
        s_n = math.log(sum(math.exp(gamma * c) for c in negatives)) / gamma
        s_p = cosines[label]
        total += math.log(1.0 + math.exp(s_n - s_p))
    return total / len(labels)


def tensors():
    """The hand-made example in float64: features (leaf), bias-free classifier holding W, labels."""
    features = torch.tensor(FEATURES, dtype=torch.float64, requires_grad=True)
    classifier = nn.Linear(3, 4, bias=False).double()
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor(CLASS_WEIGHTS, dtype=torch.float64))
    return features, classifier, torch.tensor(LABELS)


STEPS: list[TrainStep] = []  # the fake steps made so far (the latest one's context holds its logs)


def fake_step(features, classifier, labels, *, ce: float = 1.0, head: str = "global") -> TrainStep:
    """A TrainStep for one objective module whose BN output is ``features``."""
    model = SimpleNamespace(
        objective_modules={head: SimpleNamespace(classifier=classifier)}, head_names=[head]
    )
    output = HeadOutput(embedding=features, bn_feature=features, logits=classifier(features))
    STEPS.append(
        TrainStep(
            context=StepContext(model, loss=None),
            images=torch.empty(0),
            labels=labels,
            outputs={head: output},
            task_losses={f"{head}/ce": torch.tensor(ce)},
        )
    )
    return STEPS[-1]


def last_step_logs() -> dict:
    """What the latest fake step logged for the regularizer (``reg/<name>/`` removed)."""
    return {key.split("/", 2)[2]: value for key, value in STEPS[-1].context.logs.items()}


# ---------------------------------------------------------------------------------------- values (eq. 6)
@pytest.mark.parametrize("gamma", [1.0, 5.0, 30.0])
def test_value_matches_eq6_term_by_term(gamma):
    features, classifier, labels = tensors()
    value = stop_gradient_softmax_loss(features, classifier.weight, labels, gamma=gamma)
    assert value.item() == pytest.approx(eq6_reference(FEATURES, CLASS_WEIGHTS, LABELS, gamma), rel=1e-12)

    terms = SGSL(gamma=gamma, ce_gate=None).loss_terms(fake_step(features, classifier, labels))
    assert terms["global/sgsl"].item() == pytest.approx(value.item(), rel=1e-12)


def test_feature_gradient_matches_finite_differences_of_eq6():
    features, classifier, labels = tensors()
    stop_gradient_softmax_loss(features, classifier.weight, labels, gamma=30.0).backward()
    step = 1e-6
    for i in range(3):
        for d in range(3):
            plus = [row[:] for row in FEATURES]
            minus = [row[:] for row in FEATURES]
            plus[i][d] += step
            minus[i][d] -= step
            numeric = (
                eq6_reference(plus, CLASS_WEIGHTS, LABELS, 30.0)
                - eq6_reference(minus, CLASS_WEIGHTS, LABELS, 30.0)
            ) / (2 * step)
            assert features.grad[i, d].item() == pytest.approx(numeric, abs=1e-7)


def test_value_is_invariant_to_feature_and_proxy_norms():
    features, classifier, labels = tensors()
    reference = stop_gradient_softmax_loss(features, classifier.weight, labels, gamma=30.0)
    feature_scale = torch.tensor([[0.1], [7.0], [2.0]], dtype=torch.float64)
    proxy_scale = torch.tensor([[3.0], [0.2], [11.0], [1.5]], dtype=torch.float64)
    scaled = stop_gradient_softmax_loss(
        features * feature_scale, classifier.weight * proxy_scale, labels, gamma=30.0
    )
    torch.testing.assert_close(scaled, reference)


# ---------------------------------------------------------------------------------------- stop-gradient
def test_no_gradient_reaches_the_classifier_but_features_get_one():
    features, classifier, labels = tensors()
    term = SGSL(ce_gate=None).loss_terms(fake_step(features, classifier, labels))["global/sgsl"]
    term.backward()
    assert classifier.weight.grad is None or torch.all(classifier.weight.grad == 0)
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_in_a_real_model_the_classifiers_are_trained_by_ce_alone():
    torch.manual_seed(0)
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=5, stripe_channels=8)
    images, labels = torch.randn(8, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])
    outputs = model(images)
    task_losses = ReIDLoss(triplet=False)(outputs, labels)
    step = TrainStep(StepContext(model, ReIDLoss(triplet=False)), images, labels, outputs, task_losses)
    terms = SGSL(ce_gate=None).loss_terms(step)
    assert set(terms) == {"global/sgsl", "stripe1/sgsl", "stripe2/sgsl"}

    classifiers = [module.classifier.weight for module in model.objective_modules.values()]
    ce_only = torch.autograd.grad(task_losses["total"], classifiers, retain_graph=True)
    with_sgsl = torch.autograd.grad(
        task_losses["total"] + sum(terms.values()), classifiers, retain_graph=True
    )
    for expected, actual in zip(ce_only, with_sgsl, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # ... while the features (BN outputs) do get SGSL's gradient, down to the first convolution.
    stem_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    (stem_gradient,) = torch.autograd.grad(sum(terms.values()), [stem_conv.weight])
    assert stem_gradient.abs().sum() > 0


# ---------------------------------------------------------------------------------------- gate
def test_gate_closes_above_the_ce_threshold_and_opens_at_or_below_it():
    features, classifier, labels = tensors()
    expected = eq6_reference(FEATURES, CLASS_WEIGHTS, LABELS, 30.0)
    sgsl = SGSL(ce_gate=3.0, beta=1.0)

    closed = sgsl.loss_terms(fake_step(features, classifier, labels, ce=3.2))["global/sgsl"]
    logs = last_step_logs()
    assert closed.item() == 0.0 and not closed.requires_grad  # nothing added, no graph: no gradient
    assert logs["global/gate_open"] == 0.0
    assert logs["global/l_sgsl"].item() == pytest.approx(expected, rel=1e-12)  # still logged
    assert not logs["global/l_sgsl"].requires_grad

    for ce in (2.9, 3.0):  # official code: CE > 3 → CE alone, otherwise CE + SGSL
        opened = sgsl.loss_terms(fake_step(features, classifier, labels, ce=ce))["global/sgsl"]
        logs = last_step_logs()
        assert opened.item() == pytest.approx(expected, rel=1e-12)
        assert logs["global/gate_open"] == 1.0
        (gradient,) = torch.autograd.grad(opened, features)
        assert gradient.abs().sum() > 0


def test_gate_is_checked_every_batch_and_can_be_disabled():
    features, classifier, labels = tensors()
    sgsl = SGSL(ce_gate=3.0)
    states = []
    for ce in (4.0, 2.0, 4.0):  # it closes again when CE rises (official code), not a one-way switch
        sgsl.loss_terms(fake_step(features, classifier, labels, ce=ce))
        states.append(last_step_logs()["global/gate_open"])
    assert states == [0.0, 1.0, 0.0]

    always = SGSL(ce_gate=None).loss_terms(fake_step(features, classifier, labels, ce=100.0))["global/sgsl"]
    assert always.requires_grad and always.item() > 0


def test_logs_belong_to_their_step():
    features, classifier, labels = tensors()
    sgsl = SGSL()
    sgsl.loss_terms(fake_step(features, classifier, labels))
    assert set(last_step_logs()) == {"global/l_sgsl", "global/gate_open"}
    assert fake_step(features, classifier, labels).context.logs == {}  # a new step starts with none


# ---------------------------------------------------------------------------------------- γ and β
@pytest.mark.parametrize("gamma", [1.0, 30.0, 1000.0])
def test_gamma_on_equal_negatives_gives_the_closed_form(gamma):
    # x = e1, proxy of class 0 = e1, the 3 negatives are orthogonal to x: s_p = 1, s_n = log(3)/γ.
    features = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    class_weights = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, -1.0, 0]], dtype=torch.float64)
    value = stop_gradient_softmax_loss(features, class_weights, torch.tensor([0]), gamma=gamma)
    assert value.item() == pytest.approx(math.log1p(math.exp(math.log(3) / gamma - 1)), rel=1e-12)


def test_gamma_one_is_the_softmax_of_eq5_on_cosines_and_large_gamma_the_max_of_eq8():
    features, classifier, labels = tensors()
    cosines = F.normalize(features, dim=1) @ F.normalize(classifier.weight, dim=1).t()
    # eq. 5: softplus(LSE^1_{j≠y} − s_p) is the plain softmax cross-entropy (here of the cosines).
    at_one = stop_gradient_softmax_loss(features, classifier.weight, labels, gamma=1.0)
    torch.testing.assert_close(at_one, F.cross_entropy(cosines, labels))
    # eq. 8: as γ grows, LSE^γ → max over the negatives (from above, so the loss decreases with γ).
    hardest = cosines.masked_fill(F.one_hot(labels, 4).bool(), -2.0).amax(dim=1)
    limit = F.softplus(hardest - cosines[torch.arange(3), labels]).mean()
    values = [
        stop_gradient_softmax_loss(features, classifier.weight, labels, gamma=g).item()
        for g in (1.0, 10.0, 30.0, 100.0, 1e5)
    ]
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(limit.item(), abs=1e-4)


def test_beta_scales_the_term_and_its_gradient():
    features, classifier, labels = tensors()
    base = SGSL(beta=1.0, ce_gate=None).loss_terms(fake_step(features, classifier, labels))["global/sgsl"]
    scaled = SGSL(beta=2.5, ce_gate=None).loss_terms(fake_step(features, classifier, labels))["global/sgsl"]
    assert scaled.item() == pytest.approx(2.5 * base.item(), rel=1e-12)
    (grad_base,) = torch.autograd.grad(base, features)
    (grad_scaled,) = torch.autograd.grad(scaled, features)
    torch.testing.assert_close(grad_scaled, 2.5 * grad_base)


# ---------------------------------------------------------------------------------------- precision, heads
def test_computed_in_float32_under_autocast_and_stable_at_large_gamma():
    torch.manual_seed(0)
    features, class_weights = torch.randn(16, 256), torch.randn(40, 256)
    labels = torch.randint(0, 40, (16,))
    reference = stop_gradient_softmax_loss(features, class_weights, labels, gamma=30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = stop_gradient_softmax_loss(features, class_weights, labels, gamma=30.0)
        from_bf16 = stop_gradient_softmax_loss(features.bfloat16(), class_weights, labels, gamma=30.0)
    assert autocast.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(autocast, reference, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(stop_gradient_softmax_loss(features, class_weights, labels, gamma=1e4))


def test_heads_restrict_the_terms_and_unknown_heads_fail_at_attach():
    features, classifier, labels = tensors()
    step = fake_step(features, classifier, labels, head="stripe1")
    step.outputs["global"] = step.outputs["stripe1"]
    step.model.objective_modules["global"] = step.model.objective_modules["stripe1"]
    step.task_losses["global/ce"] = step.task_losses["stripe1/ce"]
    assert set(SGSL(heads=["stripe1"]).loss_terms(step)) == {"stripe1/sgsl"}
    assert set(SGSL().loss_terms(step)) == {"stripe1/sgsl", "global/sgsl"}

    module = SimpleNamespace(model=SimpleNamespace(head_names=["global", "stripe1", "stripe2"]))
    SGSL(heads=["global"]).attach(module)
    with pytest.raises(ConfigError, match="stripe3"):
        SGSL(heads=["global", "stripe3"]).attach(module)


def compose_regularizers(*overrides: str) -> nn.ModuleDict:
    """The ``regularizer`` node of the composed main config, built (only the config groups are involved)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return build_regularizers(compose("train", overrides=list(overrides)).regularizer)


def test_yaml_builds_the_paper_defaults():
    sgsl = compose_regularizers("regularizer=sgsl")["sgsl"]
    assert isinstance(sgsl, SGSL) and sgsl.name == "sgsl"
    assert (sgsl.gamma, sgsl.beta, sgsl.ce_gate, sgsl.heads) == (30.0, 1.0, 3.0, None)
    assert list(sgsl.parameters()) == []  # nothing of its own to train or checkpoint
    assert compose_regularizers("regularizer=sgsl", "regularizer.sgsl.heads=[global]")["sgsl"].heads == (
        "global",
    )
    assert compose_regularizers("regularizer=sgsl", "regularizer.sgsl.ce_gate=null")["sgsl"].ce_gate is None


# ---------------------------------------------------------------------------------------- end to end
def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def logged(row: dict[str, str], key: str) -> float:
    assert row.get(key), f"{key} was not logged at step {row['step']}"
    return float(row[key])


def check_training_rows(rows: list[dict[str, str]], *, other_terms: tuple[str, ...] = ()) -> None:
    """Each training step logs, per head, L_SGSL, the gate (consistent with that head's CE) and the term
    added (L_SGSL when open, β = 1; 0 when closed), and train/loss = task terms + added terms exactly."""
    train_rows = [row for row in rows if row.get("train/loss")]
    assert train_rows, "no training rows in csv/metrics.csv"
    for row in train_rows:
        expected_loss = sum(logged(row, key) for key in other_terms)
        for head in ("global", "stripe1", "stripe2"):
            ce, value = logged(row, f"train/{head}/ce"), logged(row, f"reg/sgsl/{head}/l_sgsl")
            gate_open, term = logged(row, f"reg/sgsl/{head}/gate_open"), logged(row, f"reg/sgsl/{head}/sgsl")
            assert math.isfinite(value) and value > 0
            assert gate_open == float(ce <= 3.0)
            assert term == pytest.approx(value if gate_open else 0.0, rel=1e-6)
            expected_loss += ce + logged(row, f"train/{head}/triplet") + term
        assert logged(row, "train/loss") == pytest.approx(expected_loss, rel=1e-5)


def run(tiny_config, *overrides: str) -> list[dict[str, str]]:
    from reidreg.train import train

    cfg = tiny_config("trainer.max_epochs=1", *overrides)  # one epoch of 4 steps is enough here
    train(cfg)
    return read_metrics(Path(cfg.paths.output_dir))


def test_end_to_end_sgsl_trains_and_logs(tiny_config):
    check_training_rows(run(tiny_config, "regularizer=sgsl"))


@pytest.mark.slow
def test_end_to_end_sgsl_with_rbr(tiny_config):
    check_training_rows(run(tiny_config, "regularizer=sgsl", "backbone.rbr=true"))


@pytest.mark.slow
@pytest.mark.skipif(not ADAPTIVE_L2_YAML.exists(), reason="conf/regularizer/adaptive_l2.yaml not written yet")
def test_end_to_end_sgsl_with_adaptive_l2(tiny_config):
    # The penalty as a loss term (its default is a gradient transform, not part of train/loss).
    rows = run(tiny_config, "regularizer=[adaptive_l2,sgsl]", "regularizer.adaptive_l2.differentiable=true")
    check_training_rows(rows, other_terms=("reg/adaptive_l2/penalty",))


# ---------------------------------------------------------------------------------------- feature
def step_with_two_features(embedding, bn_feature, classifier, labels, *, ce: float = 1.0) -> TrainStep:
    """One objective module whose retrieval embedding and BN output are different tensors."""
    step = fake_step(bn_feature, classifier, labels, ce=ce)
    step.outputs["global"] = HeadOutput(
        embedding=embedding, bn_feature=bn_feature, logits=step.outputs["global"].logits
    )
    return step


def test_feature_embedding_is_eq6_on_the_embedding_with_its_gradient_and_none_through_bn():
    _, classifier, labels = tensors()
    embedding = torch.tensor(FEATURES, dtype=torch.float64, requires_grad=True)
    bn_rows = [[0.3, -1.0, 0.4], [2.0, 0.5, -0.1], [-0.6, 0.9, 1.2]]
    bn_feature = torch.tensor(bn_rows, dtype=torch.float64, requires_grad=True)
    for feature, rows, used, unused in (
        ("embedding", FEATURES, embedding, bn_feature),
        ("bn", bn_rows, bn_feature, embedding),
    ):
        step = step_with_two_features(embedding, bn_feature, classifier, labels)
        term = SGSL(feature=feature, beta=2.0).loss_terms(step)["global/sgsl"]
        assert term.item() == pytest.approx(2.0 * eq6_reference(rows, CLASS_WEIGHTS, LABELS, 30.0), rel=1e-12)
        gradient, no_gradient = torch.autograd.grad(term, [used, unused], allow_unused=True)
        assert no_gradient is None
        for i, d in ((0, 0), (1, 2), (2, 1)):  # central differences of 2·eq. 6 in the used feature
            plus, minus = [r[:] for r in rows], [r[:] for r in rows]
            plus[i][d] += 1e-6
            minus[i][d] -= 1e-6
            numeric = (
                eq6_reference(plus, CLASS_WEIGHTS, LABELS, 30.0)
                - eq6_reference(minus, CLASS_WEIGHTS, LABELS, 30.0)
            ) / 1e-6
            assert gradient[i, d].item() == pytest.approx(numeric, abs=2e-7)
        assert classifier.weight.grad is None  # the proxies stay detached


def test_feature_option_in_the_yaml_and_invalid_values_refused():
    assert compose_regularizers("regularizer=sgsl")["sgsl"].feature == "bn"
    assert compose_regularizers("regularizer=sgsl", "regularizer.sgsl.feature=embedding")["sgsl"].feature == (
        "embedding"
    )
    assert not SGSL.OPTION_RULES["feature"].accepts("logits")  # checked before any work


def test_every_objective_module_adds_its_own_term_of_weight_beta():
    """Three modules → three terms of weight β: 3× the paper's single-head weight unless heads=[global]."""
    _, classifier, labels = tensors()
    rows = {"global": FEATURES, "stripe1": [[0.1, 1.0, 0.2]] * 3, "stripe2": [[1.0, -1.0, 0.5]] * 3}
    step = fake_step(torch.tensor(rows["global"], dtype=torch.float64), classifier, labels)
    for head in ("stripe1", "stripe2"):
        features = torch.tensor(rows[head], dtype=torch.float64)
        step.outputs[head] = HeadOutput(embedding=features, bn_feature=features, logits=classifier(features))
        step.model.objective_modules[head] = step.model.objective_modules["global"]
        step.task_losses[f"{head}/ce"] = torch.tensor(1.0)
    terms = SGSL(beta=0.5, ce_gate=None).loss_terms(step)
    assert set(terms) == {"global/sgsl", "stripe1/sgsl", "stripe2/sgsl"}
    for head, values in rows.items():
        assert terms[f"{head}/sgsl"].item() == pytest.approx(
            0.5 * eq6_reference(values, CLASS_WEIGHTS, LABELS, 30.0)
        )
    assert set(SGSL(beta=0.5, ce_gate=None, heads=["global"]).loss_terms(step)) == {"global/sgsl"}


# ---------------------------------------------------------------------------------------- no host sync
@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The gate as it runs on an accelerator: never decided on the host, even for CPU tensors."""
    monkeypatch.setattr(SGSL, "closed_on_host", staticmethod(lambda is_open: False))


@pytest.mark.parametrize("ce_gate", [3.0, None])
def test_gated_step_reads_no_tensor_value_on_the_host(as_on_a_gpu, ce_gate):
    features, classifier, labels = tensors()
    sgsl = SGSL(ce_gate=ce_gate)
    with HostReads() as reads:
        for ce in (2.0, 4.0):
            term = sgsl.loss_terms(fake_step(features, classifier, labels, ce=ce))["global/sgsl"]
            term.backward()
            logs = last_step_logs()
    assert reads.ops == []
    if ce_gate is not None:  # logged as device tensors
        assert isinstance(logs["global/gate_open"], torch.Tensor)
    assert isinstance(logs["global/l_sgsl"], torch.Tensor)


def test_device_side_gate_adds_exactly_zero_and_no_gradient_when_closed(as_on_a_gpu):
    features, classifier, labels = tensors()
    expected = eq6_reference(FEATURES, CLASS_WEIGHTS, LABELS, 30.0)
    sgsl = SGSL(ce_gate=3.0, beta=1.5)
    closed = sgsl.loss_terms(fake_step(features, classifier, labels, ce=3.2))["global/sgsl"]
    logs = last_step_logs()
    assert closed.item() == 0.0 and logs["global/gate_open"].item() == 0.0
    assert logs["global/l_sgsl"].item() == pytest.approx(expected, rel=1e-12)
    (gradient,) = torch.autograd.grad(closed, features)
    assert torch.equal(gradient, torch.zeros_like(features))

    opened = sgsl.loss_terms(fake_step(features, classifier, labels, ce=3.0))["global/sgsl"]
    assert opened.item() == pytest.approx(1.5 * expected, rel=1e-12)
    assert last_step_logs()["global/gate_open"].item() == 1.0
    (gradient,) = torch.autograd.grad(opened, features)
    reference = SGSL(ce_gate=None, beta=1.5).loss_terms(fake_step(features, classifier, labels))[
        "global/sgsl"
    ]
    torch.testing.assert_close(gradient, torch.autograd.grad(reference, features)[0], rtol=0, atol=0)


def test_closed_gate_passes_no_nan_from_a_non_finite_value(as_on_a_gpu):
    features, classifier, labels = tensors()
    with torch.no_grad():
        features[1, 0] = float("inf")  # L2-normalising an infinite feature gives NaN: L_SGSL is NaN
    sgsl = SGSL(ce_gate=3.0)
    closed = sgsl.loss_terms(fake_step(features, classifier, labels, ce=5.0))["global/sgsl"]
    assert last_step_logs()["global/l_sgsl"].isnan()
    assert closed.item() == 0.0  # selected away, not multiplied by 0 (0·NaN = NaN)
    (gradient,) = torch.autograd.grad(closed, features)
    assert torch.equal(gradient, torch.zeros_like(features))
