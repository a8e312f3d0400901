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
