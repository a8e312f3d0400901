"""The command lines answer a typo or ``--help`` before torch and Lightning load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pytorch_lightning", "lightning_fabric", "timm", "torchvision")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime <args>``; the top-level names of every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    names = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return result, names


@pytest.mark.parametrize("command", ["reidreg.train", "reidreg.evaluate"])
def test_a_config_typo_is_reported_without_importing_torch(command):
    result, modules = imported_modules("-m", command, "trainer.max_epoch=3", "ckpt_path=x")
    assert result.returncode != 0
    assert "max_epoch" in result.stderr
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_help_does_not_import_torch():
    result, modules = imported_modules("-m", "reidreg.train", "--help")
    assert result.returncode == 0 and "Powered by Hydra" in result.stdout
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize("verify", ["true", "false"])
def test_a_corrupt_image_is_one_error_line_naming_the_file(tmp_path, verify):
    """Checked before training (default), or found by a loader worker: one line either way."""
    import shutil

    from tests.conftest import TINY_OVERRIDES, compose_config

    cfg = compose_config(tmp_path)  # the tiny synthetic set, generated once in the shared data folder
    from reidreg.data.datasets import build_dataset

    source = build_dataset("synthetic", Path(cfg.paths.data_dir), **cfg.dataset.options).root
    data_dir = tmp_path / "data"
    shutil.copytree(source, data_dir / source.name)
    broken = sorted((data_dir / source.name / "bounding_box_train").glob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.num_workers")]
    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        *overrides,
        "data.num_workers=2",
        f"data.verify_images={verify}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and broken.name in errors[0], result.stderr
    assert "Traceback" not in result.stderr
