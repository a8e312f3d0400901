"""Shared fixtures: tiny configs composed from conf/ for end-to-end runs on synthetic data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from reidreg.utils.config import register_resolvers

# Lightning's DDP setup writes these into os.environ; left there by a test that trains in-process, they
# would reach the next test's subprocesses (a "node" that knows a MASTER_PORT it was never given).
DISTRIBUTED_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)


SESSION_DISTRIBUTED_ENVIRONMENT = {name: os.environ.get(name) for name in DISTRIBUTED_VARIABLES}


def restore_session_distributed_environment() -> None:
    for name, value in SESSION_DISTRIBUTED_ENVIRONMENT.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def distributed_environment_of_the_session():
    """Before each test (a module fixture may have trained already) and after it."""
    restore_session_distributed_environment()
    yield
    restore_session_distributed_environment()


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A tiny synthetic dataset and network: a full train/val/test cycle in seconds on 2 CPU cores.
TINY_OVERRIDES = [
    "dataset=synthetic",
    "dataset.options.num_ids=16",
    "dataset.options.num_cameras=3",
    "dataset.options.images_per_id=6",
    "dataset.options.height=64",
    "dataset.options.width=32",
    "data.height=64",
    "data.width=32",
    "data.num_identities=4",
    "data.num_instances=2",
    "data.num_workers=0",
    "data.val_identities=2",
    "data.batch_size_test=256",
    "backbone=test_resnet",
    "model.stripe_channels=16",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "progress.mode=off",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "optim.schedule.warmup_epochs=1",
]


def train_command(run_dir: Path, data_dir: Path, *overrides: str, max_epochs: int = 1) -> list[str]:
    """``python -m reidreg.train`` as a user types it, with the tiny settings, ``max_epochs`` and
    ``overrides``, writing to ``run_dir`` (``hydra.run.dir``)."""
    return [
        sys.executable,
        "-m",
        "reidreg.train",
        *[o for o in TINY_OVERRIDES if not o.startswith("trainer.max_epochs")],
        f"trainer.max_epochs={max_epochs}",
        *overrides,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def compose_config(tmp_path: Path, *overrides: str, config_name: str = "train") -> DictConfig:
    """The composed config of ``python -m reidreg.train`` with the tiny settings plus ``overrides``.

    The synthetic data is generated once under the session's shared data folder; outputs go to
    ``tmp_path/run``.
    """
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(
            config_name,
            overrides=[
                *TINY_OVERRIDES,
                f"paths.data_dir={tmp_path.parent / 'data'}",
                f"paths.output_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(*overrides)`` → composed config for a tiny end-to-end run in ``tmp_path``."""
    return lambda *overrides: compose_config(tmp_path, *overrides)
