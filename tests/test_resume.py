"""Exact resume as users run it: the CLI as typed, loader workers, a real SIGKILL and SIGTERM mid-epoch.

A resumed run must end with bit-identical weights (CPU) and the same CSV history as an uninterrupted one,
in the run's own directory, with the checkpoint's own experiment.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reidreg.errors import ConfigError
from reidreg.run_dir import remove_temporaries
from reidreg.training.callbacks.checkpointing import AtomicCheckpointIO
from reidreg.training.resume import resumed_config
from reidreg.utils.config import flatten, register_resolvers
from tests.conftest import TINY_OVERRIDES, compose_config

REPO = Path(__file__).resolve().parents[1]
# Three epochs of 8 steps, loader workers as users have them, a mid-epoch resume point every 3 steps.
RUN = [
    *(o for o in TINY_OVERRIDES if not o.startswith(("data.num_workers", "trainer.max_epochs"))),
    "data.num_workers=2",
    "data.steps_per_epoch=8",
    "trainer.max_epochs=3",
    "checkpoint.every_n_steps=3",
    "test=false",
]


def cli(run_dir: Path, *overrides: str, data_dir: Path, background: bool = False, env: dict | None = None):
    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        *overrides,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    environment = {**os.environ, **(env or {})}
    if background:
        return subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment
        )
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)


def global_step(checkpoint: Path) -> int | None:
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # being replaced right now
        return None


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (weights, optimizer and scheduler state, regularizer buffers, ...)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    )
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same_run(resumed: Path, reference: Path, *, checkpoints: tuple[str, ...] = ("last.ckpt",)) -> None:
    """Bit-identical tensors in each of ``checkpoints`` and the same CSV history."""
    for name in checkpoints:
        a, b = (
            {  # callback state names files by path: the same run in another folder
                key.replace(str(run), "<run>"): value
                for key, value in tensors(
                    torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)
                ).items()
            }
            for run in (reference, resumed)
        )
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{name}: {key}")
    assert csv_rows(resumed) == csv_rows(reference)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """``references(regularizer)``: the run of ``RUN`` with that regularizer, never interrupted, and the
    shared data folder (each trained once per module)."""
    base = tmp_path_factory.mktemp("resume")
    runs: dict[str, Path] = {}

    def reference(regularizer: str) -> tuple[Path, Path]:
        if regularizer not in runs:
            run_dir = base / f"reference-{len(runs)}"
            result = cli(run_dir, *RUN, f"regularizer={regularizer}", data_dir=base / "data")
            assert result.returncode == 0, result.stderr
            runs[regularizer] = run_dir
        return runs[regularizer], base / "data"

    return reference


@pytest.fixture(scope="module")
def uninterrupted(references) -> tuple[Path, Path]:
    """The reference without a regularizer (conf/'s default)."""
    return references("none")


def wait_for_mid_epoch_checkpoint(process: subprocess.Popen, run_dir: Path, steps_per_epoch: int) -> int:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before a mid-epoch resume point was seen"
        step = global_step(checkpoint) if checkpoint.is_file() else None
        if step and step % steps_per_epoch:
            return step
        time.sleep(0.05)
    raise TimeoutError("no mid-epoch resume point")


@pytest.mark.parametrize(
    ("regularizer", "move"),
    [
        # The fast suite resumes the hardest case (two regularizers, adaptive L2's state); the rest is slow.
        pytest.param("[adaptive_l2,sgsl]", False),
        pytest.param("none", False, marks=pytest.mark.slow),
        pytest.param("constant_l2", True, marks=pytest.mark.slow),
        pytest.param("adaptive_l2", False, marks=pytest.mark.slow),
    ],
)
def test_sigkill_mid_epoch_then_resume_by_ckpt_path_alone_is_bit_identical(
    tmp_path, references, regularizer, move
):
    reference, data_dir = references(regularizer)
    run_dir = tmp_path / "killed"
    process = cli(run_dir, *RUN, f"regularizer={regularizer}", data_dir=data_dir, background=True)
    try:
        wait_for_mid_epoch_checkpoint(process, run_dir, steps_per_epoch=8)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # killed: no goodbye
    if move:  # the run's folder moved (to scratch, another disk) before it is resumed
        run_dir = Path(shutil.move(run_dir, tmp_path / "moved"))

    # The README's resume command, as typed: nothing but the checkpoint.
    resumed = cli(tmp_path / "fresh", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / "fresh").exists()  # it continued in the run's own directory
    assert_same_run(run_dir, reference, checkpoints=("last.ckpt", "best.ckpt"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"
    assert len(record["resumes"]) == 1 and record["resumes"][0]["global_step"] % 8


def test_sigterm_saves_a_resume_point_stops_and_requeues(tmp_path, uninterrupted):
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "preempted"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    process = cli(run_dir, *RUN, data_dir=data_dir, background=True, env=env)
    wait_for_mid_epoch_checkpoint(process, run_dir, steps_per_epoch=8)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stderr = stderr.decode()

    assert process.returncode == 4, stderr
    assert "received SIGTERM at step" in stderr and "Traceback" not in stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["reason"]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]

    # The requeued job runs the same command in the same run directory: it resumes by itself.
    resumed = cli(run_dir, *RUN, data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


def test_resume_refuses_to_change_the_experiment_and_accepts_operational_options(tmp_path, uninterrupted):
    reference, data_dir = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    refused = cli(tmp_path / "x", ckpt, "regularizer=constant_l2", "seed=3", data_dir=data_dir)
    assert refused.returncode == 2
    message = refused.stderr.strip().splitlines()
    assert len(message) == 1, refused.stderr
    assert "regularizer: checkpoint {}, requested {constant_l2}" in message[0]
    assert "seed: checkpoint 0, requested 3" in message[0]
    assert not (tmp_path / "x").exists()  # nothing left behind

    # Equal to the checkpoint's values, or operational (more epochs, fewer workers): the run continues.
    extended = cli(
        tmp_path / "y",
        ckpt,
        "backbone=test_resnet",
        "data.num_identities=4",
        "trainer.max_epochs=4",
        "data.num_workers=0",
        data_dir=data_dir,
    )
    assert extended.returncode == 0, extended.stderr
    assert not (tmp_path / "y").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4 * 8


SELECTIONS = [
    *sorted(path.stem for path in (REPO / "conf" / "regularizer").glob("*.yaml")),
    "[adaptive_l2,sgsl]",
    "[constant_l2,sgp]",
]


def compose_flat(overrides: Sequence[str]) -> dict:
    """The unresolved config ``python -m reidreg.train`` composes with ``overrides``, flattened (in an
    ``initialize_config_dir`` context, as the CLI's ``_compose_flat``)."""
    return flatten(OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=False))


def resume_by_cli(tmp_path: Path, checkpoint_config: dict, *overrides: str):
    """``resumed_config`` as ``python -m reidreg.train ckpt_path=<ckpt> *overrides`` computes it: the
    request is composed from conf/'s defaults plus ``overrides``, nothing of the original command."""
    command = ["ckpt_path=last.ckpt", *overrides]
    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        requested = compose("train", overrides=command)
        requested.paths.output_dir = str(tmp_path / "new")  # what Hydra's run directory resolves to
        return resumed_config(requested, checkpoint_config, overrides=command, compose=compose_flat)


def checkpoint_config_of(tmp_path: Path, *overrides: str) -> dict:
    """The resolved config a run of ``overrides`` stores in its checkpoints."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        config = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path / 'run'}"])
        return OmegaConf.to_container(config, resolve=True)


@pytest.mark.parametrize(
    "run",
    [
        *(f"experiment=quickstart regularizer={selection}" for selection in SELECTIONS),
        "dataset=msmt17 backbone=resnet101 regularizer=[adaptive_l2,sgsl] trainer=ddp trainer.devices=2",
    ],
)
def test_ckpt_path_alone_continues_the_checkpoints_experiment(tmp_path, run):
    stored = checkpoint_config_of(tmp_path, *run.split())
    resumed = OmegaConf.to_container(resume_by_cli(tmp_path, stored))
    assert resumed == stored  # nothing of conf/'s defaults (regularizer none, synthetic data, ...) leaks in


def test_ckpt_path_with_operational_overrides_keeps_the_regularizers(tmp_path):
    stored = checkpoint_config_of(tmp_path, "experiment=quickstart", "regularizer=[adaptive_l2,sgsl]")
    longer = resume_by_cli(tmp_path, stored, "trainer.max_epochs=30", "data.num_workers=0", "logger=wandb")
    assert longer.trainer.max_epochs == 30 and longer.data.num_workers == 0
    assert "wandb" in OmegaConf.to_container(longer.logger)
    assert longer.regularizer == OmegaConf.create(stored["regularizer"])


def test_resume_refuses_another_regularizer_set_or_topology(tmp_path):
    stored = checkpoint_config_of(tmp_path, "regularizer=[adaptive_l2,sgsl]")
    assert resume_by_cli(tmp_path, stored, "regularizer=[adaptive_l2,sgsl]").regularizer.keys() == {
        "adaptive_l2",
        "sgsl",
    }
    for other, shown in [
        ("regularizer=none", "{}"),
        ("regularizer=adaptive_l2", "{adaptive_l2}"),
        ("regularizer=[adaptive_l2,sgsl,constant_l2]", "{adaptive_l2, constant_l2, sgsl}"),
    ]:
        with pytest.raises(
            ConfigError, match=rf"regularizer: checkpoint \{{adaptive_l2, sgsl\}}, requested {shown}"
        ):
            resume_by_cli(tmp_path, stored, other)
    with pytest.raises(ConfigError, match="trainer.devices: checkpoint 1, requested 2"):
        resume_by_cli(tmp_path, stored, "trainer.devices=2")
    # Two nodes of one device: two processes again, the same global batch as two devices on one node.
    two = checkpoint_config_of(tmp_path, "trainer.devices=2")
    assert resume_by_cli(tmp_path, two, "trainer.devices=1", "trainer.num_nodes=2").trainer.num_nodes == 2


def test_resume_from_python_compares_the_whole_config(tmp_path):
    stored = {"seed": 0, "regularizer": {"constant_l2": {"lam": 0.005}}, "paths": {"output_dir": "a"}}
    cfg = compose_config(tmp_path, "regularizer=constant_l2")
    checkpoint = {**__import__("omegaconf").OmegaConf.to_container(cfg, resolve=True), **stored}
    without_l2 = compose_config(tmp_path, "ckpt_path=x")
    with pytest.raises(Exception, match=r"regularizer: checkpoint \{constant_l2\}, requested \{\}"):
        resumed_config(without_l2, checkpoint, overrides=None)
    same = compose_config(tmp_path, "regularizer=constant_l2", "data.num_workers=3")
    resumed = resumed_config(same, checkpoint, overrides=None)
    assert resumed.data.num_workers == 3 and resumed.regularizer.constant_l2.lam == 0.005


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    started = tmp_path / "writing"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, pathlib, sys, torch\n"
            "from reidreg.training.callbacks.checkpointing import AtomicCheckpointIO\n"
            "class Slow:\n"
            "    def __reduce__(self):\n"
            f"        pathlib.Path({str(started)!r}).touch(); time.sleep(60); return (int, ())\n"
            "checkpoint = {'big': torch.zeros(1_000_000), 'slow': Slow()}\n"
            f"AtomicCheckpointIO().save_checkpoint(checkpoint, {str(path)!r})\n",
        ],
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert torch.load(path, weights_only=False) == {"step": 1}
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the killed write's temporary file, which the next run removes
    remove_temporaries(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
