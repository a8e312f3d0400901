"""LinR (eqs. (4)–(10) and Algorithm 1 of the LinR paper; docs/methods/linr.md) against direct evaluations
on small hand-made examples."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from reidreg.errors import ConfigError
from reidreg.losses import ReIDLoss
from reidreg.models import HeadOutput, ReIDModel, ResNetBackbone
from reidreg.regularizers import StepContext, TrainingPlan
from reidreg.regularizers.linr import LinR, mixed_pair_kl, random_partner, scaled_input_kl
from reidreg.train import train
from reidreg.utils.config import register_resolvers
from tests.host_reads import HostReads

CONF = Path(__file__).resolve().parents[1] / "conf"
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _direct_linr_kl(mixed: list[float], x: list[float], y: list[float], a: float, *, confident_only=False):
    """Eqs. 5–7 (and eq. 9) with explicit loops over classes: (KL, kept class indices)."""
    p1, px, py = _softmax(mixed), _softmax(x), _softmax(y)
    p2 = [a * px[c] + (1 - a) * py[c] for c in range(len(mixed))]
    kept = [c for c in range(len(mixed)) if not confident_only or p2[c] > 1 / len(mixed)]
    return sum(p1[c] * math.log(p1[c] / p2[c]) for c in kept), kept


MIXED = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -2.0, 1.5]])
LOGITS_X = torch.tensor([[1.0, 0.0, -1.0, 3.0], [-0.5, 2.5, 0.0, 0.1]])
LOGITS_Y = torch.tensor([[0.0, 4.0, 0.2, -1.0], [1.0, 1.0, -3.0, 0.0]])


def test_kl_matches_direct_sum_over_classes():
    a = 0.3
    got, keep = mixed_pair_kl(MIXED, LOGITS_X, LOGITS_Y, a)
    for i in range(2):
        expected, _ = _direct_linr_kl(MIXED[i].tolist(), LOGITS_X[i].tolist(), LOGITS_Y[i].tolist(), a)
        assert got[i].item() == pytest.approx(expected, rel=1e-5)
    assert keep.all()


def test_kl_is_zero_for_a_linear_network_and_positive_otherwise():
    # A network whose softmax output is exactly a·P(x) + b·P(y) is "linear" (eq. 3): KL = 0.
    a = 0.6
    p2 = a * LOGITS_X.softmax(1) + (1 - a) * LOGITS_Y.softmax(1)
    zero, _ = mixed_pair_kl(p2.log(), LOGITS_X, LOGITS_Y, a)
    torch.testing.assert_close(zero, torch.zeros(2), atol=1e-6, rtol=0)
    positive, _ = mixed_pair_kl(MIXED, LOGITS_X, LOGITS_Y, a)
    assert (positive > 0).all()


def test_linrc_keeps_exactly_the_classes_with_p2_above_one_over_nc_without_renormalising():
    a = 0.5
    got, keep = mixed_pair_kl(MIXED, LOGITS_X, LOGITS_Y, a, confident_only=True)
    for i in range(2):
        expected, kept = _direct_linr_kl(
            MIXED[i].tolist(), LOGITS_X[i].tolist(), LOGITS_Y[i].tolist(), a, confident_only=True
        )
        assert keep[i].nonzero().flatten().tolist() == kept
        assert 0 < len(kept) < 4  # the example does drop some classes
        assert got[i].item() == pytest.approx(expected, rel=1e-5)


def test_no_gradient_flows_through_p2():
    a = 0.3
    mixed = MIXED.clone().requires_grad_(True)
    logits_x, logits_y = LOGITS_X.clone().requires_grad_(True), LOGITS_Y.clone().requires_grad_(True)
    kl, _ = mixed_pair_kl(mixed, logits_x, logits_y, a)
    kl.sum().backward()
    assert logits_x.grad is None and logits_y.grad is None
    # Gradient w.r.t. the mixed logits = that of KL(softmax z ‖ Q) with Q a constant: P1 ⊙ (log P1/Q − KL).
    p1 = MIXED.softmax(1)
    q = a * LOGITS_X.softmax(1) + (1 - a) * LOGITS_Y.softmax(1)
    log_ratio = (p1 / q).log()
    kl_const = (p1 * log_ratio).sum(1, keepdim=True)
    torch.testing.assert_close(mixed.grad, p1 * (log_ratio - kl_const), atol=1e-6, rtol=1e-5)


def test_linrnm_is_eq10_literally():
    a = 0.4
    got = scaled_input_kl(MIXED, LOGITS_X, a)
    for i in range(2):
        p1, px = _softmax(MIXED[i].tolist()), _softmax(LOGITS_X[i].tolist())
        expected = sum(p1[c] * math.log(p1[c] / (a * px[c])) for c in range(4))
        assert got[i].item() == pytest.approx(expected, rel=1e-5)
        # = the normalised KL − log a: same gradient, constant offset
        normalised = sum(p1[c] * math.log(p1[c] / px[c]) for c in range(4))
        assert got[i].item() == pytest.approx(normalised - math.log(a), rel=1e-5)


@pytest.mark.parametrize("batch_size", [2, 3, 8, 64])
def test_partner_is_a_permutation_without_fixed_points(batch_size):
    for seed in range(20):
        partner = random_partner(batch_size, np.random.default_rng(seed))
        assert sorted(partner.tolist()) == list(range(batch_size))
        assert (partner != torch.arange(batch_size)).all()
    with pytest.raises(ValueError, match="batch size"):
        random_partner(1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- the step
class TwoHeadNet(nn.Module):
    """A tiny stand-in for ReIDModel: two objective modules of identity logits; records its inputs."""

    def __init__(self, in_features: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({h: nn.Linear(in_features, num_classes) for h in ("global", "stripe1")})
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> dict[str, HeadOutput]:
        self.inputs.append(images.detach().clone())
        flat = images.flatten(1)
        outputs = {}
        for name, linear in self.heads.items():
            logits = torch.tanh(linear(flat)) * 3  # non-linear, so that the KL is not trivially 0
            outputs[name] = HeadOutput(embedding=logits, bn_feature=logits, logits=logits)
        return outputs


class FakeModule:
    """What LinR uses of ReIDModule: model, loss, epoch, optimizers, optimize, trainer.should_stop."""

    def __init__(self, regularizer: LinR, net: nn.Module | None = None) -> None:
        self.regularizer = regularizer
        self.model = net or TwoHeadNet()
        self.loss = ReIDLoss()
        self.current_epoch, self.freeze_backbone_epochs = 0, 0
        self.trainer = SimpleNamespace(should_stop=False)
        regularizer.attach(self)
        self.main_optimizer = torch.optim.Adam(self.model.parameters())
        self.all_optimizers = [self.main_optimizer, *regularizer.extra_optimizers(self)]
        self.stepped: list[torch.optim.Optimizer] = []

    def optimizers(self):
        return self.all_optimizers

    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.stepped.append(optimizer)

    def step(self, batch: tuple) -> dict | None:
        """A training step as TrainingStep runs it: LinR's phase step while it owns the step, else None."""
        context = StepContext(
            self.model,
            self.loss,
            epoch=self.current_epoch,
            optimize=self.optimize,
            stop=lambda: setattr(self.trainer, "should_stop", True),
        )
        if not self.regularizer.owns_step(context):
            return None
        return self.regularizer.phase_step(context, *batch)


def _batch(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 1, 2, 3), torch.arange(batch_size) // 2  # P×K labels, K = 2


def _mix_partners(images: torch.Tensor, mixed: torch.Tensor, a: float) -> list[int]:
    """For each row of ``mixed``, the j with mixed_i = a·x_i + (1 − a)·x_j (asserting there is one)."""
    partners = []
    for i in range(len(images)):
        matches = [
            j
            for j in range(len(images))
            if torch.allclose(mixed[i], a * images[i] + (1 - a) * images[j], atol=1e-6)
        ]
        assert len(matches) == 1
        partners.append(matches[0])
    return partners


def test_linr_loss_mixes_two_different_images_and_sums_the_kl_over_heads():
    regularizer, net = LinR(), TwoHeadNet()
    images, _ = _batch()
    kl, logs = regularizer.linr_loss(net, images, np.random.default_rng(0))
    a = logs["a"]
    assert 0 < a < 1
    assert len(net.inputs) == 2 and torch.equal(net.inputs[0], images)  # f(x), then f(a·x + b·y)
    partner = _mix_partners(images, net.inputs[1], a)
    assert all(j != i for i, j in enumerate(partner))
    with torch.no_grad():
        plain, mixed = net(images), net(net.inputs[1])
    expected = 0.0
    for head in ("global", "stripe1"):
        for i, j in enumerate(partner):
            value, _ = _direct_linr_kl(
                mixed[head].logits[i].tolist(),
                plain[head].logits[i].tolist(),
                plain[head].logits[j].tolist(),
                a,
            )
            expected += value / len(images)  # mean over pairs, sum over heads
    assert kl.item() == pytest.approx(expected, rel=1e-4)
    assert logs["kl"].item() == pytest.approx(kl.item())


def test_linrnm_calls_f_on_the_batch_and_on_the_batch_scaled_by_a_only():
    regularizer, net = LinR(variant="linrnm"), TwoHeadNet()
    images, _ = _batch()
    kl, logs = regularizer.linr_loss(net, images, np.random.default_rng(1))
    a = logs["a"]
    assert len(net.inputs) == 2
    assert torch.equal(net.inputs[0], images)
    assert torch.equal(net.inputs[1], a * images)  # no second image
    with torch.no_grad():
        plain, scaled = net(images), net(a * images)
    expected = sum(scaled_input_kl(scaled[h].logits, plain[h].logits, a).mean() for h in plain)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)


def test_linrc_logs_the_share_of_kept_classes():
    regularizer, net = LinR(variant="linrc"), TwoHeadNet()
    _, logs = regularizer.linr_loss(net, _batch()[0], np.random.default_rng(2))
    assert 0 < logs["kept_class_share"].item() < 1


def test_phases_alternate_with_their_own_optimizers_then_training_stops():
    regularizer = LinR(rounds=2, cls_steps=2, linr_steps=3)
    module = FakeModule(regularizer)
    main, cls_opt, linr_opt = module.all_optimizers
    phases = []
    for _ in range(10):
        assert not module.trainer.should_stop
        logs = module.step(_batch())
        phases.append(int(logs["phase"]))
        assert ("ce" in logs) == (logs["phase"] == 0) and ("kl" in logs) == (logs["phase"] == 1)
    assert phases == [0, 0, 1, 1, 1] * 2
    assert module.stepped == ([cls_opt] * 2 + [linr_opt] * 3) * 2
    assert main not in module.stepped
    assert module.trainer.should_stop  # Algorithm 1 line 8 after T rounds
    weights = [p.detach().clone() for p in module.model.parameters()]
    assert module.step(_batch()) == {}  # done: no further update
    assert len(module.stepped) == 10
    assert all(torch.equal(w, p) for w, p in zip(weights, module.model.parameters(), strict=True))


def test_classification_phase_loss_is_the_task_loss_or_its_ce_terms():
    images, labels = _batch()
    for cls_loss in ("task", "ce"):
        regularizer = LinR(cls_loss=cls_loss)
        module = FakeModule(regularizer)
        loss, logs = regularizer.classification_loss(module, images, labels)
        with torch.no_grad():
            terms = module.loss(module.model(images), labels)
        ce = terms["global/ce"] + terms["stripe1/ce"]
        assert logs["ce"].item() == pytest.approx(ce.item())
        assert loss.item() == pytest.approx((terms["total"] if cls_loss == "task" else ce).item())


def test_linrnl_uses_no_classification_phase_and_no_labels():
    regularizer = LinR(variant="linrnl", rounds=1, cls_steps=5, linr_steps=3)
    module = FakeModule(regularizer)
    images, _ = _batch()
    for _ in range(3):
        assert module.step((images, None))["phase"] == 1
    assert module.stepped == [module.all_optimizers[2]] * 3 and module.trainer.should_stop


def test_start_epoch_keeps_standard_training_until_then():
    regularizer = LinR(start_epoch=2, rounds=1, cls_steps=1, linr_steps=1)
    module = FakeModule(regularizer)
    for epoch in (0, 1):
        module.current_epoch = epoch
        assert module.step(_batch()) is None
    module.current_epoch = 2
    assert module.step(_batch())["phase"] == 0
    assert int(regularizer.steps_done) == 1


def test_resumed_state_continues_in_the_same_phase_with_the_same_draws():
    first = LinR(rounds=2, cls_steps=1, linr_steps=2, seed=3)
    module = FakeModule(first)
    for _ in range(2):
        module.step(_batch())
    resumed = LinR(rounds=2, cls_steps=1, linr_steps=2, seed=3)
    resumed.load_state_dict(first.state_dict())  # steps_done travels in the checkpoint
    assert int(resumed.steps_done) == 2
    images = _batch()[0]
    logs = [FakeModule(r, TwoHeadNet()).step((images, None)) for r in (first, resumed)]
    assert logs[0]["phase"] == logs[1]["phase"] == 1 and logs[0]["round"] == 0
    assert logs[0]["a"] == logs[1]["a"]


def test_optimizers_follow_the_paper_by_default_and_in_the_yaml(tiny_config):
    from_yaml = instantiate(tiny_config("regularizer=linr", "seed=5").regularizer.linr)
    assert from_yaml.seed == 5 and from_yaml.variant == "linr" and from_yaml.alpha == 0.75
    for regularizer in (LinR(), from_yaml):
        cls_opt, linr_opt = regularizer.extra_optimizers(FakeModule(LinR()))
        assert isinstance(cls_opt, torch.optim.SGD) and isinstance(linr_opt, torch.optim.SGD)
        for optimizer, (lr, momentum, weight_decay) in (
            (cls_opt, (3e-4, 0.9, 5e-4)),
            (linr_opt, (1e-2, 0.9, 0)),
        ):
            group = optimizer.param_groups[0]
            assert (group["lr"], group["momentum"], group["weight_decay"]) == (lr, momentum, weight_decay)


# ---------------------------------------------------------------------------------------------- start
def test_init_from_loads_the_network_weights_of_a_checkpoint(tmp_path):
    source = TwoHeadNet()
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["regularizers.other.theta"] = torch.zeros(3)  # not the network's: ignored
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "reidreg_config": {}}, path)
    module = FakeModule(LinR(init_from=str(path)))
    for name, value in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value)


def test_init_from_errors_name_the_option_and_the_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigError, match=r"init_from.*nope\.ckpt"):
        FakeModule(LinR(init_from=str(missing)))
    other = tmp_path / "other.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in TwoHeadNet(num_classes=3).state_dict().items()},
            "reidreg_config": {},
        },
        other,
    )
    with pytest.raises(ConfigError, match=r"init_from.*other\.ckpt"):
        FakeModule(LinR(init_from=str(other)))
    plain = tmp_path / "plain.pt"
    torch.save(TwoHeadNet().state_dict(), plain)
    with pytest.raises(ConfigError, match=r"init_from.*plain\.pt.*not a reidreg.train checkpoint"):
        FakeModule(LinR(init_from=str(plain)))


def test_invalid_options_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        LinR(init_from="x.ckpt", start_epoch=3)
    # checked before any work by reidreg.options:
    assert not LinR.OPTION_RULES["variant"].accepts("linrx")
    assert not LinR.OPTION_RULES["cls_loss"].accepts("focal")
    regularizer = LinR(start_epoch=5)
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        regularizer.attach(SimpleNamespace(freeze_backbone_epochs=10))


# ---------------------------------------------------------------------------------------------- end to end
def _logged_rows(run_dir: Path, column: str) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get(column)]


def test_linrc_refines_from_start_epoch_inside_a_run(tiny_config):
    cfg = tiny_config(
        "regularizer=linr",
        "regularizer.linr.variant=linrc",
        "regularizer.linr.start_epoch=1",
        "regularizer.linr.rounds=1",
        "regularizer.linr.cls_steps=1",
        "regularizer.linr.linr_steps=2",
        "trainer.max_epochs=3",
        "test=false",
    )
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    phases = _logged_rows(run_dir, "reg/linr/phase")
    assert [float(row["reg/linr/phase"]) for row in phases] == [0, 1, 1]
    for row in phases:
        classification = float(row["reg/linr/phase"]) == 0
        logged = ("reg/linr/ce",) if classification else ("reg/linr/kl", "reg/linr/kept_class_share")
        assert all(row[key] for key in logged)
    standard_steps = [int(row["step"]) for row in _logged_rows(run_dir, "train/loss")]
    assert standard_steps and max(standard_steps) < min(int(row["step"]) for row in phases)
    # Epoch 0 is standard training (4 steps); refinement ends within epoch 1 and the run stops there.
    assert {int(row["epoch"]) for row in phases} == {1}
    assert max(int(row["epoch"]) for row in _logged_rows(run_dir, "val/mAP")) == 1


@pytest.mark.slow
def test_linr_refines_a_checkpoint_of_another_run(tmp_path, tiny_config):
    baseline = tiny_config("trainer.max_epochs=1", "test=false", f"paths.output_dir={tmp_path / 'baseline'}")
    train(baseline)
    checkpoint = tmp_path / "baseline" / "checkpoints" / "last.ckpt"
    refined = tiny_config(
        "regularizer=linr",
        f"regularizer.linr.init_from={checkpoint}",
        "regularizer.linr.variant=linrnl",
        "regularizer.linr.rounds=1",
        "regularizer.linr.linr_steps=2",
        "test=false",
        f"paths.output_dir={tmp_path / 'refined'}",
    )
    train(refined)
    phases = _logged_rows(tmp_path / "refined", "reg/linr/phase")
    assert [float(row["reg/linr/phase"]) for row in phases] == [1, 1]
    assert not _logged_rows(tmp_path / "refined", "train/loss")  # refinement from the first step


@pytest.mark.slow
def test_resuming_a_refinement_run_ends_with_the_same_weights(tmp_path, tiny_config):
    common = (
        "regularizer=linr",
        "regularizer.linr.start_epoch=1",
        "regularizer.linr.rounds=2",
        "regularizer.linr.cls_steps=3",
        "regularizer.linr.linr_steps=3",
        "test=false",
        "data.val_identities=0",  # no validation: last.ckpt is written every epoch
    )

    def run(name: str, *overrides: str) -> dict[str, torch.Tensor]:
        train(tiny_config(*common, *overrides, f"paths.output_dir={tmp_path / name}"))
        checkpoint = torch.load(
            tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        return checkpoint["state_dict"]

    uninterrupted = run("a", "trainer.max_epochs=8")
    interrupted = run("b", "trainer.max_epochs=8", "+trainer.max_steps=12")  # stops mid-refinement
    resumed = run("c", "trainer.max_epochs=8", f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    assert int(interrupted["regularizers.linr.steps_done"]) == 6
    assert (
        int(uninterrupted["regularizers.linr.steps_done"])
        == int(resumed["regularizers.linr.steps_done"])
        == 12
    )
    network = [key for key in uninterrupted if key.startswith("model.")]
    assert any(not torch.equal(uninterrupted[key], interrupted[key]) for key in network)
    for key in network:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------- bn_mode
def trained_like_reid_model() -> ReIDModel:
    """The global branch of the AdaptiveReID network on test_resnet (bias-free conv1 + BN, as ResNet-50),
    with confident classifiers (std 1) and running statistics filled by a few batches, in train mode."""
    torch.manual_seed(0)
    model = ReIDModel(ResNetBackbone("test_resnet"), num_classes=8, regional_branches=False)
    with torch.no_grad():
        for module in model.objective_modules.values():
            module.classifier.weight.normal_(std=1.0)
        for _ in range(5):
            model(torch.rand(8, 3, 32, 16))
    return model.train()


class FixedDraws:
    """Stands in for the numpy generator: ``beta`` returns a chosen ``a``, ``permutation`` a seeded one."""

    def __init__(self, a: float) -> None:
        self.a, self.rng = a, np.random.default_rng(0)

    def beta(self, *_: float) -> float:
        return self.a

    def permutation(self, n: int) -> np.ndarray:
        return self.rng.permutation(n)


def _loss_and_gradient_norm(regularizer: LinR, model: nn.Module, images: torch.Tensor, a: float):
    model.zero_grad(set_to_none=True)
    loss, _ = regularizer.linr_loss(model, images, FixedDraws(a))
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def test_linrnm_is_invariant_to_a_under_batch_statistics_and_not_under_running_statistics():
    # conv1 has no bias: with batch statistics the first BN removes a, f(a·x) ≈ f(x), so per module
    # eq. 10 ≈ KL(P ‖ P) − log a: the loss is −log a per objective module, whatever the network does.
    model, images = trained_like_reid_model(), torch.rand(8, 3, 32, 16)
    for a in (0.35, 0.5):
        nm_train, nm_train_grad = _loss_and_gradient_norm(LinR(variant="linrnm"), model, images, a)
        _, mixed_train_grad = _loss_and_gradient_norm(LinR(variant="linr"), model, images, a)
        assert nm_train == pytest.approx(-math.log(a), abs=1e-4)
        assert nm_train_grad < 0.01 * mixed_train_grad  # nearly inert next to LinR's own gradient
        nm_eval, nm_eval_grad = _loss_and_gradient_norm(
            LinR(variant="linrnm", bn_mode="eval"), model, images, a
        )
        assert nm_eval + math.log(a) > 0.01  # KL(softmax f(a·x) ‖ softmax f(x)): the network's response
        assert nm_eval_grad > 10 * nm_train_grad


def _batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value.clone()
        for name, value in model.state_dict().items()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_bn_mode_eval_freezes_running_statistics_in_the_linr_phase_only():
    images, labels = torch.rand(8, 3, 32, 16), torch.arange(8) // 2
    for bn_mode in ("train", "eval"):
        model = trained_like_reid_model()
        before = _batchnorm_state(model)
        regularizer = LinR(bn_mode=bn_mode)
        regularizer.linr_loss(model, images, np.random.default_rng(0))
        after = _batchnorm_state(model)
        counts = [k for k in before if k.endswith("num_batches_tracked")]
        if bn_mode == "eval":  # both forward passes (P2 target, mixed) use and keep the running statistics
            assert all(torch.equal(before[k], after[k]) for k in before)
        else:  # each of the two forward passes updates them once
            assert all(int(after[k]) == int(before[k]) + 2 for k in counts)
        assert all(m.training for m in model.modules())  # BN layers back in train mode
        # The classification phase is a standard training forward pass in both modes.
        regularizer.classification_loss(FakeModule(regularizer, model), images, labels)
        assert all(int(_batchnorm_state(model)[k]) == int(after[k]) + 1 for k in counts)


def _direct_eq7_on(model: nn.Module, images: torch.Tensor, a: float, partner: torch.Tensor) -> torch.Tensor:
    """Eqs. 5–7 written out with plain softmax, P2 detached, mean over pairs, sum over modules."""
    with torch.no_grad():
        p_x = {head: out.logits.softmax(1) for head, out in model(images).items()}
    mixed = model(a * images + (1 - a) * images[partner])
    total = 0.0
    for head, p in p_x.items():
        p1, p2 = mixed[head].logits.softmax(1), a * p + (1 - a) * p[partner]
        total = total + (p1 * (p1 / p2).log()).sum(1).mean()
    return total


def test_bn_mode_eval_is_eq7_on_the_network_with_running_statistics_value_and_gradient():
    model, images = trained_like_reid_model(), torch.rand(8, 3, 32, 16)
    loss, logs = LinR(bn_mode="eval").linr_loss(model, images, np.random.default_rng(4))
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradient = torch.autograd.grad(loss, parameters, allow_unused=True)

    draws = np.random.default_rng(4)  # the same a and pairs, drawn in the same order
    a = float(draws.beta(0.75, 0.75))
    partner = random_partner(8, draws)
    assert a == logs["a"]
    model.eval()  # every BatchNorm on its running statistics (the network has no dropout)
    expected = _direct_eq7_on(model, images, a, partner)
    expected_gradient = torch.autograd.grad(expected, parameters, allow_unused=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    for got, want in zip(gradient, expected_gradient, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    # With batch statistics the same draws give another value: the two modes differ on this network.
    model.train()
    train_loss, _ = LinR().linr_loss(model, images, np.random.default_rng(4))
    assert abs(train_loss.item() - loss.item()) > 0.1 * loss.item()


def test_invalid_bn_mode_is_refused():
    assert not LinR.OPTION_RULES["bn_mode"].accepts("batch")  # checked before any work


# ---------------------------------------------------------------------------------------------- cls_loss
def test_ce_plain_is_eq8_cross_entropy_without_smoothing_or_triplet_value_and_gradient():
    images, labels = _batch()
    regularizer = LinR(cls_loss="ce_plain")
    module = FakeModule(regularizer)
    loss, logs = regularizer.classification_loss(module, images, labels)
    with torch.no_grad():
        outputs = module.model(images)
    expected = 0.0
    for head in ("global", "stripe1"):  # H(p, q) = −Σ_c p_c log q_c with p one-hot: −log q_y
        for row, label in zip(outputs[head].logits.tolist(), labels.tolist(), strict=True):
            expected += -math.log(_softmax(row)[label]) / len(labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["cls_loss"].item() == pytest.approx(expected, rel=1e-5)
    smoothed = module.loss(outputs, labels)
    assert logs["ce"].item() == pytest.approx((smoothed["global/ce"] + smoothed["stripe1/ce"]).item())
    assert abs(logs["ce"].item() - expected) > 1e-3  # label smoothing is not in ce_plain

    # Gradient w.r.t. each module's logits: (softmax − one-hot) / B, the classic CE gradient.
    outputs = module.model(images)
    logits = [outputs[head].logits for head in ("global", "stripe1")]
    plain = sum(F.cross_entropy(z, labels) for z in logits)
    got = torch.autograd.grad(plain, logits, retain_graph=True)
    for z, gradient in zip(logits, got, strict=True):
        expected_gradient = (z.softmax(1) - F.one_hot(labels, z.shape[1])) / len(labels)
        torch.testing.assert_close(gradient, expected_gradient.detach())
    # and the regularizer's loss has exactly that gradient w.r.t. the parameters
    params = list(module.model.parameters())
    loss, _ = regularizer.classification_loss(module, images, labels)
    for ours, reference in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(plain, params), strict=True
    ):
        torch.testing.assert_close(ours, reference)


# ---------------------------------------------------------------------------------------------- check(plan)
def plan(max_epochs: int, steps_per_epoch: int, *, freeze: int = 0, pretrained: bool = True) -> TrainingPlan:
    return TrainingPlan(
        max_epochs=max_epochs,
        steps_per_epoch=steps_per_epoch,
        freeze_backbone_epochs=freeze,
        pretrained_backbone=pretrained,
        resuming=False,
    )


def test_check_refuses_rounds_that_do_not_fit_naming_every_option_and_number():
    regularizer = LinR(rounds=3, cls_steps=200, linr_steps=200, start_epoch=2)
    regularizer.check(plan(max_epochs=14, steps_per_epoch=100))  # 12 epochs × 100 = 1200 steps: fits
    with pytest.raises(ConfigError) as refused:
        regularizer.check(plan(max_epochs=13, steps_per_epoch=100))
    message = str(refused.value)
    for part in (
        "regularizer.linr.rounds/cls_steps/linr_steps",
        "3·(200 + 200) = 1200",
        "only 1100 fit",
        "epoch 2",
        "trainer.max_epochs=13",
        "data.steps_per_epoch=100",
        "at least 14",
    ):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="only 0 fit"):  # refinement would start after the last epoch
        regularizer.check(plan(max_epochs=2, steps_per_epoch=100))


def test_check_counts_from_epoch_0_with_init_from_and_no_classification_steps_for_linrnl():
    from_checkpoint = LinR(rounds=2, cls_steps=3, linr_steps=3, init_from="best.ckpt")
    from_checkpoint.check(plan(max_epochs=2, steps_per_epoch=6))
    with pytest.raises(ConfigError, match=r"at least 3\b"):
        from_checkpoint.check(plan(max_epochs=2, steps_per_epoch=5))
    no_labels = LinR(variant="linrnl", rounds=2, cls_steps=100, linr_steps=3, init_from="best.ckpt")
    no_labels.check(plan(max_epochs=1, steps_per_epoch=6))
    with pytest.raises(ConfigError, match=r"2·\(0 \+ 3\) = 6 steps \(cls_steps counts 0: variant=linrnl"):
        no_labels.check(plan(max_epochs=1, steps_per_epoch=5))


def test_check_refuses_to_refine_the_network_as_built_unless_allowed():
    for options in ({}, {"start_epoch": 0}):
        for pretrained, built in (
            (True, "ImageNet backbone with randomly"),
            (False, "randomly initialised net"),
        ):
            with pytest.raises(ConfigError) as refused:
                LinR(rounds=1, cls_steps=1, linr_steps=1, **options).check(plan(5, 10, pretrained=pretrained))
            message = str(refused.value)
            assert built in message
            for option in ("init_from", "start_epoch", "regularizer.linr.allow_untrained=true"):
                assert option in message
    LinR(rounds=1, cls_steps=1, linr_steps=1, allow_untrained=True).check(plan(5, 10))
    LinR(rounds=1, cls_steps=1, linr_steps=1, start_epoch=1).check(plan(5, 10))
    LinR(rounds=1, cls_steps=1, linr_steps=1, init_from="x.ckpt").check(plan(5, 10))
    # ... and the frozen-backbone refusal of attach comes before any work too
    with pytest.raises(ConfigError, match="freeze_backbone_epochs=20"):
        LinR(rounds=1, cls_steps=1, linr_steps=1, start_epoch=10).check(plan(30, 10, freeze=20))


def test_the_default_yaml_is_refused_and_its_documented_examples_pass(tiny_config):
    default = instantiate(tiny_config("regularizer=linr").regularizer.linr)
    assert default.allow_untrained is False and default.bn_mode == "train" and default.cls_loss == "task"
    with pytest.raises(ConfigError, match="allow_untrained"):
        default.check(plan(max_epochs=120, steps_per_epoch=200))
    # linr.yaml's two examples: refine a checkpoint in 6 epochs of 200 steps, or epochs 120–125 of a run.
    examples = (
        (("regularizer.linr.init_from=best.ckpt", "freeze_backbone_epochs=0"), 6),
        (("regularizer.linr.start_epoch=120",), 126),
    )
    for overrides, max_epochs in examples:
        cfg = tiny_config("regularizer=linr", *overrides, f"trainer.max_epochs={max_epochs}")
        instantiate(cfg.regularizer.linr).check(plan(cfg.trainer.max_epochs, 200, freeze=0))


@pytest.mark.parametrize("wandb", [False, True])
def test_linr_end_of_the_studies_passes_the_checks(wandb):
    """sweeps/regularizer/linr_end.yaml as compare_regularizers composes it (Hydra study and W&B sweep)."""
    register_resolvers()
    if wandb:  # the W&B sweep's command: the train config, --config-dir=sweeps, experiment=_paper_recipe
        with initialize_config_dir(str(CONF), version_base="1.3"):
            overrides = [f"hydra.searchpath=[file://{SWEEPS}]", "experiment=_paper_recipe"]
            cfg = compose("train", overrides=[*overrides, "regularizer=linr_end"])
    else:
        with initialize_config_dir(str(SWEEPS), version_base="1.3"):
            overrides = [f"hydra.searchpath=[file://{CONF}]", "regularizer=linr_end"]
            cfg = compose("compare_regularizers", overrides=overrides)
    linr = instantiate(cfg.regularizer.linr)
    assert linr.start_epoch == 114
    linr.check(
        TrainingPlan(
            max_epochs=cfg.trainer.max_epochs,
            steps_per_epoch=cfg.data.steps_per_epoch,
            freeze_backbone_epochs=cfg.freeze_backbone_epochs,
            pretrained_backbone=cfg.backbone.pretrained,
            resuming=False,
        )
    )


def test_end_of_run_warning_only_when_the_run_stopped_before_refinement_did(caplog):
    regularizer = LinR(rounds=1, cls_steps=1, linr_steps=2)
    module = FakeModule(regularizer)
    module.step(_batch())
    with caplog.at_level("WARNING", logger="reidreg.regularizers.linr"):
        regularizer.on_train_end(module)  # e.g. trainer.max_steps stopped the run after 1 of 3 steps
    assert "LinR stopped after 1 of 3 steps" in caplog.text
    caplog.clear()
    for _ in (1, 2):
        module.step(_batch())
    with caplog.at_level("WARNING", logger="reidreg.regularizers.linr"):
        regularizer.on_train_end(module)
    assert "LinR stopped" not in caplog.text


# ---------------------------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("variant", ["linr", "linrc", "linrnl", "linrnm"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_steps_read_no_tensor_value_on_the_host(variant, bn_mode):
    regularizer = LinR(variant=variant, bn_mode=bn_mode, rounds=2, cls_steps=1, linr_steps=1)
    module = FakeModule(regularizer)
    with HostReads() as reads:
        logs = [module.step(_batch()) for _ in range(regularizer.total_steps)]
    assert reads.ops == []
    assert [log["phase"] for log in logs] == ([1.0] * 2 if variant == "linrnl" else [0.0, 1.0] * 2)
    assert module.trainer.should_stop


def test_the_step_counter_is_a_python_int_mirrored_in_the_checkpointed_buffer():
    first = LinR(rounds=2, cls_steps=1, linr_steps=2)
    module = FakeModule(first)
    for batch_idx in range(4):
        module.step(_batch())
        assert first.step_count == int(first.steps_done) == batch_idx + 1
    resumed = LinR(rounds=2, cls_steps=1, linr_steps=2)
    assert resumed.step_count == 0
    holder = nn.ModuleDict({"linr": resumed})  # loaded as a submodule, as ReIDModule's checkpoint does
    holder.load_state_dict(nn.ModuleDict({"linr": first}).state_dict())
    assert resumed.step_count == 4
    assert FakeModule(resumed).step(_batch())["round"] == 1.0
    assert resumed.step_count == int(resumed.steps_done) == 5


def test_p2_with_b_zero_is_the_first_image_alone():
    got, _ = mixed_pair_kl(MIXED, LOGITS_X, LOGITS_Y, 1.0)
    for i in range(2):
        p1, px = _softmax(MIXED[i].tolist()), _softmax(LOGITS_X[i].tolist())
        assert got[i].item() == pytest.approx(
            sum(p1[c] * math.log(p1[c] / px[c]) for c in range(4)), rel=1e-5
        )
