"""The command lines answer a typo or ``--help`` before torch and Lightning load; a bad option, typed as a
user would, is one ``error:`` line naming it and what is expected, and leaves no run folder."""

from __future__ import annotations

import os
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


# Typed as a user would; each is refused before any work with exactly this line.
BAD_COMMAND_LINES = [
    (["data.num_identites=8"], "unknown option data.num_identites; did you mean data.num_identities?"),
    (["+data.num_identites=8"], "unknown option data.num_identites; did you mean data.num_identities?"),
    (
        ["regularizer.constant_l2.lam=0.01"],
        "regularizer.constant_l2.lam: the regularizer constant_l2 is not selected; add "
        "regularizer=constant_l2",
    ),
    (
        ["regularizer=sgp", "+regularizer.constant_l2.lam=0.01"],
        "regularizer.constant_l2.lam: the regularizer constant_l2 is not selected; add "
        "regularizer=[sgp,constant_l2]",
    ),
    (
        ["regularizer=constant_l3"],
        "regularizer=constant_l3: no such option; expected one of adaptive_l2, adversarial, constant_l2, "
        "linr, none, sgp, sgsl; did you mean regularizer=constant_l2?",
    ),
    (["data.num_identities=eight"], "data.num_identities='eight': expected an integer >= 1"),
    (["optim.optimizer.lr=-1e-3"], "optim.optimizer.lr=-0.001: expected a number > 0"),
    (["trainer.precision=16-mix"], "trainer.precision='16-mix': expected one of auto, 32, 32-true, 16,"),
    # a regularizer's own rule: its class is imported once everything else passed
    (
        ["+regularizer.toy._target_=tests.toy_regularizer.ToyRegularizer", "+regularizer.toy.lam=abc"],
        "regularizer.toy.lam='abc': expected a number >= 0",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), BAD_COMMAND_LINES, ids=[" ".join(o) for o, _ in BAD_COMMAND_LINES]
)
def test_a_bad_option_is_one_line_and_leaves_no_run_folder(tmp_path, overrides, expected):
    from tests.conftest import TINY_OVERRIDES

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "reidreg.train", *TINY_OVERRIDES, f"paths.data_dir={tmp_path / 'data'}"]
    command += [f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no data folder


def test_every_unknown_key_of_a_command_line_is_listed_at_once():
    result = subprocess.run(
        [sys.executable, "-m", "reidreg.evaluate", "ckpt_path=x.ckpt", "metrc=cosine", "ranked_list.topk=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.splitlines()) == (
        2,
        [
            "error: 2 invalid options:",
            "  unknown option metrc; did you mean metric?",
            "  unknown option ranked_list.topk; did you mean ranked_list.top_k?",
        ],
    )


@pytest.mark.parametrize(
    ("command", "out"), [("reidreg.extract", "images=x out=f.npz"), ("reidreg.export", "out=m.onnx")]
)
def test_deploy_errors_print_once_and_leave_the_working_folder_alone(tmp_path, command, out):
    """extract and export write into the working folder (no run folder): an error must not remove it."""
    result = subprocess.run(
        [sys.executable, "-m", command, f"ckpt_path={tmp_path / 'none.ckpt'}", *out.split()],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_path="), lines
    assert tmp_path.is_dir()


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("reidreg.extract", ["images", "out", "on_error", "num_workers"]),
        ("reidreg.export", ["format", "check_images"]),
    ],
)
def test_deploy_help_lists_its_own_options(command, options):
    result, modules = imported_modules("-m", command, "--help")
    assert result.returncode == 0
    assert f"python -m {command} ckpt_path=" in result.stdout
    assert all(f"\n{option} " in result.stdout for option in options), result.stdout
    assert "regularizer" not in result.stdout and "Configuration groups" not in result.stdout
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_evaluate_help_lists_its_own_choices():
    result, modules = imported_modules("-m", "reidreg.evaluate", "--help")
    assert result.returncode == 0 and "regularizer" not in result.stdout
    for group in ("dataset", "attack"):
        listed = next(line for line in result.stdout.splitlines() if line.startswith(f"{group}="))
        names = listed.split()[0].removeprefix(f"{group}=").split("|")
        assert sorted(names) == sorted(path.stem for path in (REPO / "conf" / group).glob("*.yaml"))
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
