"""Every option validated before any work (reidreg/options/): bad values are refused with the dotted key,
the value and what is allowed; unknown keys get "did you mean"; a regularizer's own rules are applied;
every preset and study passes; folders are probed without leaving anything behind; the Hydra callback
refuses a bad command line before Hydra creates the run folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from reidreg.errors import ConfigError
from reidreg.options.callback import ValidateBeforeRun
from reidreg.options.check import leaf_keys, validate_config
from reidreg.options.folders import check_data_dir, check_output_dir, check_paths, synthetic_needs_generation
from reidreg.options.relations import feature_rows, stripes_cut
from reidreg.options.tables import (
    ACCELERATORS,
    DATASETS,
    MONITORED,
    PRECISIONS,
    STRATEGIES,
    TRAIN_OPTIONS,
)
from reidreg.utils.config import register_resolvers
from tests import toy_regularizer
from tests.conftest import CONF_DIR, compose_config
from tests.test_sweeps import STUDIES, compose_study, study_file, swept_values

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))
REGULARIZERS = sorted(path.stem for path in (REPO / "conf" / "regularizer").glob("*.yaml"))
# Group-specific keys: present only with some options of their group.
GROUP_KEYS = {
    "dataset.options.combine_val": "dataset=msmt17",
    "optim.optimizer.momentum": None,  # an SGD optimizer's; no optim option uses SGD yet
    "trainer.sync_batchnorm": "trainer=ddp",
    **{key: "logger=wandb" for key in TRAIN_OPTIONS if key.startswith("logger.wandb.")},
}


def validate_train_config(cfg: DictConfig) -> None:
    validate_config(cfg, "train")


def validate_evaluate_config(cfg: DictConfig) -> None:
    validate_config(cfg, "evaluate")


def error_of(check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        check(*args, **kwargs)
    return str(error.value)


# ------------------------------------------------------------------------------------ bad values
BAD_TRAIN_VALUES = [
    ("data.num_instances=0", "data.num_instances=0: expected an integer >= 1"),
    ("data.num_identities=eight", "data.num_identities='eight': expected an integer >= 1"),
    ("data.num_identities=4.0", "data.num_identities=4.0: expected an integer >= 1"),
    ("data.num_identities=true", "data.num_identities=true: expected an integer >= 1"),
    ("data.height=0", "data.height=0: expected an integer >= 1"),
    ("data.width=-32", "data.width=-32: expected an integer >= 1"),
    ("data.padding=-1", "data.padding=-1: expected an integer >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
    ("data.batch_size_test=0", "data.batch_size_test=0: expected an integer >= 1"),
    ("data.steps_per_epoch=0", "data.steps_per_epoch=0: expected null or an integer >= 1"),
    ("data.random_erasing_prob=1.5", "data.random_erasing_prob=1.5: expected a number in [0, 1]"),
    ("data.hflip=yes", "data.hflip='yes': expected true or false"),
    ("data.val_identities=-1", "data.val_identities=-1: expected 0 (no hold-out), a count of"),
    ("data.val_identities=1.5", "data.val_identities=1.5: expected 0 (no hold-out), a count"),
    ("dataset.name=cuhk03", "dataset.name='cuhk03': expected one of market1501, dukemtmc, msmt17,"),
    ("dataset.options.num_ids=1", "dataset.options={num_ids: 1, "),
    ("optim.optimizer.lr=-1e-3", "optim.optimizer.lr=-0.001: expected a number > 0"),
    ("optim.optimizer.lr=nan", "optim.optimizer.lr=nan: expected a number > 0"),
    ("optim.optimizer.lr=inf", "optim.optimizer.lr=inf: expected a number > 0"),
    (
        "optim.optimizer.betas=[0.9,1.0]",
        "optim.optimizer.betas=[0.9, 1.0]: expected a list of 2 items, each a number in [0, 1)",
    ),
    ("optim.optimizer.betas=[0.9]", "optim.optimizer.betas=[0.9]: expected a list of 2 items"),
    ("optim.optimizer.weight_decay=-0.1", "optim.optimizer.weight_decay=-0.1: expected a number >= 0"),
    ("optim.schedule.warmup_epochs=-1", "optim.schedule.warmup_epochs=-1: expected an integer >= 0"),
    ("optim.schedule.warmup_start_lr=-1", "optim.schedule.warmup_start_lr=-1: expected a number >= 0"),
    (
        "optim.schedule.milestones=[70,40]",
        "optim.schedule.milestones=[70, 40]: expected a list of strictly increasing items, each an integer "
        ">= 0",
    ),
    ("optim.schedule.milestones=[-1,40]", "optim.schedule.milestones=[-1, 40]: expected a list of strictly"),
    ("optim.schedule.gamma=0", "optim.schedule.gamma=0: expected a number in (0, 1]"),
    ("optim.schedule.gamma=1.5", "optim.schedule.gamma=1.5: expected a number in (0, 1]"),
    ("optim.schedule.min_lr=-1e-6", "optim.schedule.min_lr=-1e-06: expected a number >= 0"),
    ("loss.label_smoothing=1.0", "loss.label_smoothing=1.0: expected a number in [0, 1)"),
    ("loss.triplet_margin=0", "loss.triplet_margin=0: expected null or a number > 0"),
    ("loss.ce_weight=-1", "loss.ce_weight=-1: expected a number >= 0"),
    ("loss.triplet=maybe", "loss.triplet='maybe': expected true or false"),
    ("model.stripe_channels=0", "model.stripe_channels=0: expected an integer >= 1"),
    ("model.num_stripes=0", "model.num_stripes=0: expected an integer >= 1"),
    ("model.clip=1", "model.clip=1: expected true or false"),
    ("backbone.pretrained=no", "backbone.pretrained='no': expected true or false"),
    ("evaluation.metric=cosin", "evaluation.metric='cosin': expected one of cosine, euclidean"),
    ("evaluation.rerank=2", "evaluation.rerank=2: expected true or false"),
    ("checkpoint.monitor=val/loss", "checkpoint.monitor='val/loss': expected one of val/mAP, val/R1"),
    ("trainer.precision=17", "trainer.precision=17: expected one of auto, 32, 32-true, 16, 16-mixed"),
    ("trainer.precision=16-mix", "trainer.precision='16-mix': expected one of auto, 32"),
    ("trainer.accelerator=gpuu", "trainer.accelerator='gpuu': expected one of auto, cpu, gpu, cuda,"),
    ("trainer.strategy=dpp", "trainer.strategy='dpp': expected one of auto, ddp, "),
    ("trainer.devices=0", "trainer.devices=0: expected auto, -1 (all), a count >= 1"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0: expected an integer >= 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: expected an integer >= 1"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: expected an integer >= 1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: expected an integer >= 1"),
    ("trainer.fast_dev_run=-1", "trainer.fast_dev_run=-1: expected true or false or an integer >= 0"),
    ("trainer.deterministic=always", "trainer.deterministic='always': expected true or false or one of warn"),
    ("seed=-1", "seed=-1: expected an integer in [0, 4294967295]"),
    ("seed=4294967296", "seed=4294967296: expected an integer in [0, 4294967295]"),
    ("seed=1e3", "seed=1000.0: expected an integer in [0, 4294967295]"),
    ("freeze_backbone_epochs=-1", "freeze_backbone_epochs=-1: expected an integer >= 0"),
    (
        "freeze_backbone_epochs=2",
        "freeze_backbone_epochs=2: expected an integer in [0, trainer.max_epochs=2)",
    ),
    ("test=yes", "test='yes': expected true or false"),
    ("ckpt_path=5", "ckpt_path=5: expected null or a non-empty string"),
    # keys no component reads, and a regularizer's options without the regularizer
    ("+data.num_identites=8", "unknown option data.num_identites; did you mean data.num_identities?"),
    ("+regularizer.bogus.lam=1", "regularizer.bogus: unknown regularizer; expected one of adaptive_l2,"),
    (
        "+regularizer.constant_l2.lam=0.01",
        "regularizer.constant_l2.lam: the regularizer constant_l2 is not selected; add "
        "regularizer=constant_l2",
    ),
    (
        "+trainer.gradient_clip_vl=1",
        "unknown option trainer.gradient_clip_vl; did you mean trainer.gradient_",
    ),
    # relations between options
    ("data.num_instances=1", "data.num_instances=1: expected an integer >= 2 with loss.triplet=true"),
    ("data.num_identities=1", "data.num_identities=1: expected an integer >= 2 with loss.triplet=true"),
    (
        "model.num_stripes=3",
        "model.num_stripes=3: data.height=64 gives a feature map of 4 rows (height / 16), which cuts into 2 "
        "stripes, not 3; expected one of 1, 2, 4",
    ),
    # keys other branches add (++: added now, overridden once they are in conf/)
    ("++data.verify_images=yes", "data.verify_images='yes': expected true or false"),
    ("++model.compile=1", "model.compile=1: expected true or false"),
    ("++checkpoint.every_n_steps=-1", "checkpoint.every_n_steps=-1: expected an integer >= 0"),
    ("++divergence.factor=1", "divergence.factor=1: expected a number > 1"),
    ("++divergence.check_every_n_steps=0", "divergence.check_every_n_steps=0: expected an integer >= 1"),
    ("++progress.mode=fancy", "progress.mode='fancy': expected one of auto, bar, lines, off"),
    ("++progress.every_n_steps=0", "progress.every_n_steps=0: expected an integer >= 1"),
    ("progress.every_n_seconds=-1", "progress.every_n_seconds=-1: expected null or a number > 0"),
    ("progress.throughput_warmup_steps=-1", "progress.throughput_warmup_steps=-1: expected an integer >= 0"),
    ("data.pipeline=tpu", "data.pipeline='tpu': expected one of auto, cpu, gpu"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_TRAIN_VALUES, ids=[o for o, _ in BAD_TRAIN_VALUES])
def test_bad_train_value_is_refused_with_its_key_value_and_allowed_range(tmp_path, override, expected):
    message = error_of(validate_train_config, compose_config(tmp_path, override))
    assert expected in message
    assert "\n" not in message  # one problem, one line


def test_every_problem_is_listed_one_per_line(tmp_path):
    cfg = compose_config(
        tmp_path, "data.num_instances=0", "data.num_identities=eight", "optim.optimizer.lr=-1e-3"
    )
    assert error_of(validate_train_config, cfg).splitlines() == [
        "3 invalid options:",
        "  data.num_identities='eight': expected an integer >= 1",
        "  data.num_instances=0: expected an integer >= 1",
        "  optim.optimizer.lr=-0.001: expected a number > 0",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.val_identities=0"],
        ["data.val_identities=0.5"],
        ["data.steps_per_epoch=null", "loss.triplet_margin=0.3"],
        ["trainer.precision=auto"],
        ["trainer.precision=bf16-mixed", "trainer.devices=[0,1]", "trainer.accelerator=gpu"],
        ["trainer.devices=-1", "trainer.strategy=ddp_find_unused_parameters_true"],
        ["data.num_instances=1", "loss.triplet=false"],  # K = 1 is fine without the triplet loss
        ["model.num_stripes=4"],
        ["model.num_stripes=3", "model.regional_branches=false"],  # no stripes are cut
        ["freeze_backbone_epochs=1"],
        ["seed=4294967295"],
        ["++data.verify_images=true", "++model.compile=false", "++checkpoint.every_n_steps=0"],
        ["++divergence.factor=10", "++divergence.check_every_n_steps=1", "++progress.mode=lines"],
    ],
)
def test_valid_values_pass(tmp_path, overrides):
    validate_train_config(compose_config(tmp_path, *overrides))


def test_unresolvable_interpolation_is_reported_with_its_key(tmp_path):
    cfg = compose_config(tmp_path, "data.num_workers=${oops}")
    assert "data.num_workers: cannot be resolved" in error_of(validate_train_config, cfg)


def test_stripe_rule_matches_the_model():
    """The rows the rule assumes (height / 16, or / 32) and the stripes torch.chunk cuts: exactly the
    (height, num_stripes) pairs for which the real model runs."""
    import torch

    from reidreg.models import ReIDModel, ResNetBackbone

    for last_stride_one in (True, False):
        backbone = ResNetBackbone("test_resnet", last_stride_one=last_stride_one)
        for num_stripes in (2, 3, 4):
            model = ReIDModel(backbone, 3, num_stripes=num_stripes, stripe_channels=4).eval()
            for height in (40, 64, 100):
                rows = feature_rows(height, last_stride_one=last_stride_one)
                try:
                    with torch.no_grad():
                        model(torch.zeros(1, 3, height, 16))
                    runs = True
                except ValueError:  # zip(strict=True): fewer stripes than branches
                    runs = False
                assert runs == (stripes_cut(rows, num_stripes) == num_stripes), (
                    last_stride_one,
                    num_stripes,
                    height,
                )


# ---------------------------------------------------------------------- a regularizer's own options
TOY = toy_regularizer.SELECT


def test_a_regularizers_options_are_checked_by_its_own_rules(tmp_path):
    validate_train_config(compose_config(tmp_path, TOY, "+regularizer.toy.lam=0.01"))
    cfg = compose_config(tmp_path, TOY, "+regularizer.toy.lam=abc", "+regularizer.toy.mode=both")
    assert error_of(validate_train_config, cfg).splitlines() == [
        "2 invalid options:",
        "  regularizer.toy.lam='abc': expected a number >= 0",
        "  regularizer.toy.mode='both': expected one of coupled, decoupled",
    ]
    cfg = compose_config(tmp_path, TOY, "+regularizer.toy.lamda=1")
    assert error_of(validate_train_config, cfg) == (
        "unknown option regularizer.toy.lamda; did you mean regularizer.toy.lam?"
    )


def test_a_regularizer_is_imported_only_once_the_cheap_checks_pass(tmp_path):
    missing = "+regularizer.toy._target_=reidreg.regularizers.no_such_module.Toy"
    cfg = compose_config(tmp_path, missing, "data.num_instances=0")
    assert error_of(validate_train_config, cfg) == "data.num_instances=0: expected an integer >= 1"
    assert error_of(validate_train_config, compose_config(tmp_path, missing)).startswith(
        "regularizer.toy._target_='reidreg.regularizers.no_such_module.Toy': cannot be imported ("
    )


def test_a_keyword_of_a_foreign_class_is_accepted_and_a_typo_is_not(tmp_path):
    """``trainer`` builds Lightning's Trainer: any of its keywords may be added, nothing else."""
    validate_train_config(compose_config(tmp_path, "+trainer.gradient_clip_val=1.0"))
    assert error_of(validate_train_config, compose_config(tmp_path, "+trainer.gradient_clip=1.0")) == (
        "unknown option trainer.gradient_clip; did you mean trainer.gradient_clip_val?"
    )


def test_weight_decay_beside_an_l2_penalty_is_refused(tmp_path):
    cfg = compose_config(tmp_path, "regularizer=[sgp,constant_l2]", "optim.optimizer.weight_decay=5e-4")
    assert error_of(validate_train_config, cfg) == (
        "optim.optimizer.weight_decay=0.0005: expected 0 with regularizer=constant_l2, an L2 penalty (L2 "
        "would count twice)"
    )
    validate_train_config(compose_config(tmp_path, "regularizer=sgp", "optim.optimizer.weight_decay=5e-4"))


def test_dropping_wrong_validation_labels_needs_the_synthetic_dataset(tmp_path):
    cfg = compose_train("dataset=market1501", "data.val_drop_mislabeled=true")
    assert error_of(validate_train_config, cfg) == (
        "data.val_drop_mislabeled=true: expected false with dataset=market1501 (only the synthetic dataset "
        "knows which of its training labels are wrong)"
    )
    validate_train_config(compose_config(tmp_path, "data.val_drop_mislabeled=true"))


def test_a_real_datasets_options_are_its_own():
    cfg = compose_train("dataset=msmt17", "+dataset.options.combine_vall=true")
    message = "unknown option dataset.options.combine_vall; did you mean dataset.options.combine_val?"
    assert error_of(validate_train_config, cfg) == message
    assert error_of(validate_train_config, compose_train("dataset=market1501", "+dataset.options.x=1")) == (
        "unknown option dataset.options.x"
    )


def test_extract_and_export_options_are_checked_by_their_tables(tmp_path):
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_text("")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        extract = compose("extract", overrides=[f"ckpt_path={checkpoint}", "images=x", "out=f.csv"])
        export = compose("export", overrides=[f"ckpt_path={checkpoint}", "out=model.pt", "+opset=17"])
    assert error_of(validate_config, extract, "extract") == (
        "out='f.csv': expected a file named <file>.npz or <file>.safetensors"
    )
    assert error_of(validate_config, export, "export").splitlines() == [
        "2 invalid options:",
        "  unknown option opset",
        "  out='model.pt': expected a file named <file>.onnx (format=onnx)",
    ]


# ---------------------------------------------------------------------- the tables match the code
def test_choices_match_lightning_and_reidreg():
    from lightning_fabric.connector import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    from reidreg.data.datasets import DATASET_NAMES
    from reidreg.training.module import REPORTED_METRICS

    lightning_precisions = {*get_args(_PRECISION_INPUT_INT), *get_args(_PRECISION_INPUT_STR)}
    lightning_precisions |= set(get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(PRECISIONS) == lightning_precisions | {"auto"}
    assert set(ACCELERATORS) == set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"}
    assert set(STRATEGIES) == set(StrategyRegistry.available_strategies()) | {"auto"}
    assert tuple(f"val/{metric}" for metric in REPORTED_METRICS) == MONITORED
    assert DATASET_NAMES == DATASETS


def keys_and_nodes(cfg: DictConfig) -> set[str]:
    """Every dotted key of ``cfg``, values and the nodes that hold them, unresolved."""
    leaves = set(leaf_keys(cfg))
    return leaves | {leaf.rsplit(".", i)[0] for leaf in leaves for i in range(1, leaf.count(".") + 1)}


def test_every_table_key_exists_in_the_config(tmp_path):
    """No typo in the table: each key is in the composed config (or group-specific). The converse (every
    key of a config is in the table) is what the presets below pass."""
    present = keys_and_nodes(compose_config(tmp_path))
    for key in TRAIN_OPTIONS:
        if key not in GROUP_KEYS:
            assert key in present, key
    for key, override in GROUP_KEYS.items():
        if override:
            assert key in keys_and_nodes(compose_train(override)), key


def constructor_parameters(target: str) -> set[str]:
    import inspect

    from hydra.utils import get_class

    return set(inspect.signature(get_class(target)).parameters)


def test_the_table_declares_every_option_our_components_take(tmp_path):
    """``+data.<key>`` is refused unless the table has it: the table must hold every keyword of reidreg's
    own classes (those the code passes itself aside)."""
    cfg = compose_config(tmp_path)
    passed_by_the_code = {"model": {"backbone", "num_classes"}}
    for node in ("data", "model", "loss", "backbone"):
        taken = constructor_parameters(cfg[node]["_target_"]) - passed_by_the_code.get(node, set())
        assert {f"{node}.{key}" for key in taken} <= set(TRAIN_OPTIONS), node


def test_every_regularizer_rule_names_a_constructor_parameter():
    """A rule under a name the constructor does not take would never apply."""
    from hydra.utils import get_class

    configs = [OmegaConf.load(path) for path in sorted((REPO / "conf" / "regularizer").glob("*.yaml"))]
    targets = [config["_target_"] for config in configs if "_target_" in config]  # none.yaml has none
    for target in [f"{toy_regularizer.__name__}.ToyRegularizer", *targets]:
        rules = getattr(get_class(target), "OPTION_RULES", {})
        assert {key.split(".")[0] for key in rules} <= constructor_parameters(target), target


# ------------------------------------------------------------------- presets and studies pass
def compose_train(*overrides: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_is_valid(tmp_path, experiment):
    validate_train_config(compose_train(f"experiment={experiment}"))
    # as tests/test_train.py runs it
    validate_train_config(compose_config(tmp_path, f"experiment={experiment}", "trainer.fast_dev_run=true"))


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_every_regularizer_option_is_valid(regularizer):
    validate_train_config(compose_train(f"regularizer={regularizer}"))


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
@pytest.mark.parametrize("dataset", ["market1501", "dukemtmc", "msmt17"])
def test_every_trainer_and_dataset_option_is_valid(trainer, dataset):
    validate_train_config(compose_train(f"trainer={trainer}", f"dataset={dataset}"))


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_is_valid_with_every_value_it_sweeps(name):
    params = study_file(name)["hydra"]["sweeper"]["params"]
    for key, value in params.items():
        for swept in swept_values(key, value):
            validate_train_config(compose_study(name, f"{key}={swept}"))


# --------------------------------------------------------------------------------- evaluate config
def compose_evaluate(*overrides: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("evaluate", overrides=["ckpt_path=run/checkpoints/best.ckpt", *overrides])


BAD_EVALUATE_VALUES = [
    (["metric=cosin"], "metric='cosin': expected one of cosine, euclidean"),
    (["batch_size=0"], "batch_size=0: expected an integer >= 1"),
    (["num_workers=-1"], "num_workers=-1: expected an integer >= 0"),
    (["device=gpu"], "device='gpu': expected one of auto, cpu, cuda"),
    (["flip=yes"], "flip='yes': expected true or false"),
    (["seed=-3"], "seed=-3: expected an integer in [0, 4294967295]"),
    (["ranked_list.num_queries=-1"], "ranked_list.num_queries=-1: expected an integer >= 0"),
    (["ranked_list.top_k=0"], "ranked_list.top_k=0: expected an integer >= 1"),
    (["dataset=market1501", "dataset.name=viper"], "dataset.name='viper': expected one of market1501"),
    (["attack=fgsm", "attack.eps=2"], "attack.eps=2: expected a number in [0, 1]"),
    (["attack=pgd", "attack.steps=0"], "attack.steps=0: expected null or an integer >= 1"),
    (["attack=pgd", "attack.step_size=0"], "attack.step_size=0: expected null or a number in (0, 1]"),
    (["attack=fgsm", "attack.steps=3"], "attack.steps=3: expected 1 or null (fgsm is a single step)"),
    (["attack=pgd", "attack.name=cw"], "attack.name='cw': expected one of fgsm, pgd"),
    (["attack=pgd", "attack.random_start=false"], "attack.random_start=false: expected true"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), BAD_EVALUATE_VALUES, ids=[e for _, e in BAD_EVALUATE_VALUES]
)
def test_bad_evaluate_value_is_refused_with_its_key_value_and_allowed_range(overrides, expected):
    assert expected in error_of(validate_evaluate_config, compose_evaluate(*overrides))


def test_evaluate_defaults_and_attacks_are_valid():
    validate_evaluate_config(compose_evaluate())
    for attack, dataset in (("fgsm", "msmt17"), ("pgd", "synthetic")):
        validate_evaluate_config(
            compose_evaluate(f"attack={attack}", f"dataset={dataset}", "ranked_list.num_queries=5")
        )
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        missing = compose("evaluate")  # ckpt_path: ???
    assert "ckpt_path=???: missing" in error_of(validate_evaluate_config, missing)


# ------------------------------------------------------------------------------------------- folders
def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextlib.contextmanager
def read_only(folder: Path, mechanism: str) -> Iterator[None]:
    """Make ``folder`` read-only for this process with a real mechanism, or skip if this one cannot.

    ``chmod`` does not stop root (CAP_DAC_OVERRIDE); the immutable flag and a read-only mount do.
    """
    if mechanism == "chmod":
        if os.geteuid() == 0:
            pytest.skip("chmod 0o555 does not stop root from writing")
        folder.chmod(0o555)
        undo = [lambda: folder.chmod(0o755)]
    elif mechanism == "immutable":
        if (
            shutil.which("chattr") is None
            or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
        ):
            pytest.skip(
                "chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext2/3/4, xfs, btrfs)"
            )
        undo = [lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)]
    else:  # a read-only bind mount of the folder onto itself
        bind = ["mount", "--bind", str(folder), str(folder)]
        if os.geteuid() != 0 or subprocess.run(bind, capture_output=True).returncode:
            pytest.skip("mounting needs root (CAP_SYS_ADMIN)")
        undo = [lambda: subprocess.run(["umount", str(folder)], check=True)]
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode:
            undo[0]()
            pytest.skip("read-only remount is not permitted here")
    try:
        with pytest.raises(OSError):  # the mechanism really prevents writing
            (folder / "probe").touch()
        yield
    finally:
        for step in undo:
            step()


MECHANISMS = ["chmod", "immutable", "ro_mount"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_read_only_folder_is_refused_for_writing_and_accepted_for_reading(tmp_path, mechanism):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "market1501").mkdir()
    with read_only(folder, mechanism):
        message = error_of(check_output_dir, folder / "outputs" / "run")
        assert message.startswith(f"paths.output_dir='{folder / 'outputs' / 'run'}': not writable (")
        assert f"its closest existing folder is '{folder}'" in message
        message = error_of(check_data_dir, folder, needs_write=True)
        assert message.startswith(f"paths.data_dir='{folder}': not writable (")
        check_data_dir(folder, needs_write=False)  # a real dataset is only read
    assert listing(folder) == ["market1501"]


def test_checks_create_nothing(tmp_path):
    check_output_dir(tmp_path / "a" / "b" / "run")
    check_data_dir(tmp_path / "data", needs_write=True)
    check_data_dir(tmp_path / "elsewhere", needs_write=False)  # missing: left to the dataset loader
    assert listing(tmp_path) == []


def test_a_file_where_a_folder_is_expected(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    message = error_of(check_output_dir, tmp_path / "results" / "run", "hydra.run.dir")
    assert (
        message
        == f"hydra.run.dir='{tmp_path / 'results' / 'run'}': '{tmp_path / 'results'}' is a file, not a folder"
    )
    for needs_write in (True, False):
        message = error_of(check_data_dir, tmp_path / "results", needs_write=needs_write)
        assert (
            message
            == f"paths.data_dir='{tmp_path / 'results'}': '{tmp_path / 'results'}' is a file, not a folder"
        )


def test_too_little_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        "reidreg.options.folders.shutil.disk_usage", lambda path: usage(10 * 2**30, 0, 50 * 2**20)
    )
    message = error_of(check_output_dir, tmp_path)
    assert message == (
        f"paths.output_dir='{tmp_path}': only 0.05 GiB free on its file system, at least 1.00 GiB needed "
        "(checkpoints, logs and metrics)"
    )
    check_output_dir(tmp_path, min_free_bytes=10 * 2**20)  # a smaller threshold
    message = error_of(check_data_dir, tmp_path, needs_write=True, min_free_bytes=100 * 2**20)
    assert "only 0.05 GiB free on its file system, at least 0.10 GiB needed (the synthetic dataset" in message
    check_data_dir(tmp_path, needs_write=False)  # reading needs no space


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_read_only_data_dir_is_fine_once_the_synthetic_dataset_is_complete(tmp_path, mechanism):
    from reidreg.data import build_dataset

    data = tmp_path / "data"
    data.mkdir()
    cfg = compose_config(tmp_path, f"paths.data_dir={data}")
    options = dict(cfg.dataset.options)
    assert synthetic_needs_generation(data, options)
    with read_only(data, mechanism):
        assert error_of(check_paths, cfg).startswith(f"paths.data_dir='{data}': not writable (")
    build_dataset("synthetic", data, verbose=False, **options)
    assert not synthetic_needs_generation(data, options)
    folder = next(data.iterdir())
    assert not synthetic_needs_generation(folder, options)  # the dataset folder itself
    with read_only(data, mechanism):
        check_paths(cfg)
        assert (
            len(build_dataset("synthetic", data, verbose=False, **options).train) > 0
        )  # reads, writes nothing


def test_path_problems_are_listed_together(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = compose_config(
        tmp_path, f"paths.output_dir={tmp_path / 'file' / 'run'}", f"ckpt_path={tmp_path / 'last.ckpt'}"
    )
    assert error_of(check_paths, cfg).splitlines() == [
        "2 invalid options:",
        f"  ckpt_path='{tmp_path / 'last.ckpt'}': does not exist; expected a checkpoint of reidreg.train "
        "(a .ckpt file)",
        f"  paths.output_dir='{tmp_path / 'file' / 'run'}': '{tmp_path / 'file'}' is a file, not a folder",
    ]
    (tmp_path / "last.ckpt").write_text("")
    check_paths(compose_config(tmp_path, f"ckpt_path={tmp_path / 'last.ckpt'}"))
    evaluate = compose_evaluate(f"paths.output_dir={tmp_path / 'eval'}", f"paths.data_dir={tmp_path}")
    assert "ckpt_path='run/checkpoints/best.ckpt': does not exist" in error_of(check_paths, evaluate)


# ------------------------------------------------------------------------------ before any work
def test_option_checks_import_no_torch_lightning_or_timm(tmp_path):
    code = f"""
import sys
from pathlib import Path
from reidreg.options.check import validate_config
from reidreg.options.folders import check_paths
from hydra import compose, initialize_config_dir
from tests.conftest import CONF_DIR, compose_config
cfg = compose_config(Path({str(tmp_path)!r}))
validate_config(cfg, "train")
check_paths(cfg)
with initialize_config_dir(CONF_DIR, version_base="1.3"):
    validate_config(compose("evaluate", overrides=["ckpt_path=x.ckpt", "attack=pgd"]), "evaluate")
heavy = sorted({{"torch", "pytorch_lightning", "lightning", "lightning_fabric", "timm"}} & set(sys.modules))
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_callback_accepts_a_valid_run_and_resolves_the_run_folder(tmp_path):
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=quickstart",
                f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.data_dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    ValidateBeforeRun("train").on_run_start(cfg)  # ${hydra:runtime.output_dir} is not set yet
    assert listing(tmp_path) == []
    with pytest.raises(ConfigError, match="task='predict'"):
        ValidateBeforeRun("predict")


def run_cli(module: str, task: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *overrides]  # conf/<task>.yaml registers the callback
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_train_cli_refuses_bad_values_and_a_read_only_folder_before_creating_the_run_folder(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    with read_only(folder, "chmod" if os.geteuid() != 0 else "immutable"):
        result = run_cli(
            "reidreg.train",
            "train",
            f"hydra.run.dir={folder / 'run'}",
            f"paths.data_dir={tmp_path}",
            "data.num_instances=0",
            "data.num_identities=eight",
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        "error: 3 invalid options:",
        "  data.num_identities='eight': expected an integer >= 1",
        "  data.num_instances=0: expected an integer >= 1",
    ]
    assert lines[3].startswith(f"  hydra.run.dir='{folder / 'run'}': not writable (")
    assert len(lines) == 4  # no traceback
    assert listing(folder) == []


def test_evaluate_cli_refuses_a_missing_checkpoint_before_creating_the_run_folder(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "best.ckpt"
    result = run_cli(
        "reidreg.evaluate", "evaluate", f"hydra.run.dir={tmp_path / 'eval'}", f"ckpt_path={checkpoint}"
    )
    assert (result.returncode, result.stderr) == (
        2,
        f"error: ckpt_path='{checkpoint}': does not exist; expected a checkpoint of reidreg.train "
        "(a .ckpt file)\n",
    )
    assert listing(tmp_path) == []


OVERFIT_ARMS = ["none", "constant_l2", "adaptive_l2", "sgsl"]


def test_the_overfit_study_arms_are_valid_and_differ_only_in_the_regularizer():
    arms = {name: compose_train("experiment=overfit_small", f"regularizer={name}") for name in OVERFIT_ARMS}
    for cfg in arms.values():
        validate_train_config(cfg)
    rest = [OmegaConf.to_container(cfg, resolve=False) for cfg in arms.values()]
    selected = [sorted(config.pop("regularizer")) for config in rest]
    assert selected == [[], ["constant_l2"], ["adaptive_l2"], ["sgsl"]]
    assert all(config == rest[0] for config in rest)
    # each arm runs its regularizer's defaults
    for name in OVERFIT_ARMS[1:]:
        default = OmegaConf.load(REPO / "conf" / "regularizer" / f"{name}.yaml")
        assert OmegaConf.to_container(arms[name].regularizer[name], resolve=False) == OmegaConf.to_container(
            default, resolve=False
        )


def test_the_overfit_preset_is_small_noisy_data_weak_augmentation_and_long_training():
    cfg = compose_train("experiment=overfit_small")
    assert cfg.dataset.name == "synthetic"
    size = {key: cfg.dataset.options[key] for key in ("num_ids", "images_per_id", "height", "width")}
    assert size == {"num_ids": 80, "images_per_id": 8, "height": 64, "width": 32}
    assert cfg.dataset.options.mislabeled_percent == 30
    assert (cfg.data.height, cfg.data.width) == (64, 32)
    assert not cfg.data.random_erasing and not cfg.data.pad_crop
    assert cfg.data.val_identities == 0  # the final weights are tested (a noisy hold-out misleads)
    assert cfg.backbone.name == "test_resnet" and not cfg.backbone.pretrained
    assert cfg.model.stripe_channels == 512
    assert cfg.trainer.accelerator == "cpu"
    assert (cfg.trainer.max_epochs, cfg.data.steps_per_epoch, list(cfg.optim.schedule.milestones)) == (
        120,
        10,
        [90],
    )
