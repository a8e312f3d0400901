"""One run per directory, as users meet it: the CLI as typed, loader workers, real processes and a real
full disk. A refused command leaves the directory byte for byte as it was."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reidreg.errors import ConfigError
from reidreg.run_dir import TEMP_PREFIX, RunLock
from reidreg.training.resume import resumed_config
from reidreg.training.run_record import RunRecord
from tests.conftest import TINY_OVERRIDES, compose_config

REPO = Path(__file__).resolve().parents[1]
RUN = [
    *(o for o in TINY_OVERRIDES if not o.startswith(("data.num_workers", "trainer.max_epochs"))),
    "data.num_workers=2",
    "data.steps_per_epoch=4",
    "trainer.max_epochs=1",
]


def command(run_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reidreg.train",
        *RUN,
        *overrides,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def cli(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run_dir, data_dir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=300
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (and its data folder), never to be modified: tests copy it."""
    base = tmp_path_factory.mktemp("ownership")
    result = cli(base / "run", base / "data")
    assert result.returncode == 0, result.stderr
    return base / "run", base / "data"


def copied(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def test_the_same_command_in_a_finished_run_says_so_and_changes_nothing(finished, tmp_path):
    run_dir, data_dir = copied(finished, tmp_path), finished[1]
    before = snapshot(run_dir)
    again = cli(run_dir, data_dir)
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stdout and "nothing to do" in again.stdout
    assert snapshot(run_dir) == before


def test_a_refused_resume_writes_nothing(finished, tmp_path):
    run_dir, data_dir = copied(finished, tmp_path), finished[1]
    before = snapshot(run_dir)
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    refused = cli(tmp_path / "fresh", data_dir, ckpt, "regularizer=sgsl", "trainer.max_epochs=2")
    assert refused.returncode == 2
    assert len(error_lines(refused)) == 1, refused.stderr
    assert "regularizer: checkpoint {}, requested {sgsl}" in refused.stderr
    assert snapshot(run_dir) == before
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow  # two runs: `make test-slow`
def test_a_live_run_holds_its_directory_until_its_process_ends(finished, tmp_path):
    run_dir, data_dir = copied(finished, tmp_path), finished[1]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from reidreg.run_dir import RunLock; lock = RunLock({str(run_dir)!r}).acquire(); "
            "print('held', flush=True); time.sleep(120)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        refused = cli(run_dir, data_dir, "trainer.max_epochs=2")
        assert refused.returncode == 2
        assert error_lines(refused) == [
            line for line in error_lines(refused) if f"in use by a live run (process {holder.pid}" in line
        ]
        assert len(error_lines(refused)) == 1, refused.stderr
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        holder.wait()
    extended = cli(run_dir, data_dir, "trainer.max_epochs=2")
    assert extended.returncode == 0, extended.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


@pytest.mark.slow  # two runs at once: `make test-slow`
def test_two_runs_started_together_in_one_directory_one_is_refused(finished, tmp_path):
    data_dir, run_dir = finished[1], tmp_path / "race"
    processes = [
        subprocess.Popen(command(run_dir, data_dir), cwd=REPO, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in processes)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "in use by a live run" in outcomes[1][1] or "is finished" in outcomes[1][1]
    steps = [row.split(",") for row in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(steps) == len(
        (finished[0] / "csv" / "metrics.csv").read_text().splitlines()[1:]
    )  # no row twice
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow  # two runs: `make test-slow`
def test_a_run_does_not_continue_on_changed_data(tmp_path):
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    first = cli(run_dir, data_dir, "test=false")
    assert first.returncode == 0, first.stderr
    record = (run_dir / "run.json").read_text()
    victim = next(data_dir.rglob("bounding_box_train/*.jpg"))
    victim.unlink()
    refused = cli(run_dir, data_dir, "test=false", "trainer.max_epochs=2")
    assert refused.returncode == 2
    assert len(error_lines(refused)) == 1 and "changed since the run" in refused.stderr, refused.stderr
    assert (run_dir / "run.json").read_text() == record  # the provenance is never overwritten


@pytest.fixture
def small_disk(tmp_path):
    """A run directory whose ``checkpoints/`` is a 20 MiB file system: room for two checkpoints of the tiny
    run (last, best), not for a third being written. (The run directory itself must have the free space
    that the option checks ask for.)"""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {result.stderr.decode().strip()}")
    yield mount.parent
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # a run on a small file system: `make test-slow`
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_resume_point(small_disk, finished):
    run_dir = small_disk
    failed = cli(run_dir, finished[1], "trainer.max_epochs=2")
    assert failed.returncode == 1
    errors = [line for line in error_lines(failed) if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], failed.stderr
    assert "Traceback" not in failed.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["reason"]
    assert not list(run_dir.rglob(f"{TEMP_PREFIX}*"))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


# ------------------------------------------------------------------------------ the rules, in-process
def test_a_second_lock_names_the_first_holder(tmp_path):
    in_use = rf"in use by a live run \(process {os.getpid()} on "
    with RunLock(tmp_path / "run"), pytest.raises(ConfigError, match=in_use):
        RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # nothing but the lock was there: the folder goes with it


# A run that holds its lock and a live DataLoader worker (persistent, forked, as ReIDDataModule has them).
_RUN_WITH_A_WORKER = """
import os, sys, time, torch
from reidreg.run_dir import RunLock

class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6
    def __getitem__(self, index):
        return os.getpid()

lock = RunLock(sys.argv[1]).acquire()
loader = torch.utils.data.DataLoader(Pids(), num_workers=1, persistent_workers=True, batch_size=None)
print(next(iter(loader)), flush=True)
time.sleep(120)
"""


def test_a_killed_run_frees_its_directory_at_once_though_its_loader_worker_lives_on(tmp_path):
    run = subprocess.Popen(
        [sys.executable, "-c", _RUN_WITH_A_WORKER, str(tmp_path / "run")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(run.stdout.readline())
    run.send_signal(signal.SIGKILL)
    run.wait()
    try:
        assert Path(f"/proc/{worker}").exists()  # an orphan for up to its watchdog's 5 s: the case in point
        RunLock(tmp_path / "run").acquire().release()  # the resume typed right after the kill
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize(
    ("requested", "shown"),
    [
        (
            ["regularizer=[constant_l2,sgsl]"],
            "regularizer: checkpoint {constant_l2}, requested {constant_l2, sgsl}",
        ),
        (["regularizer=sgsl"], "regularizer: checkpoint {constant_l2}, requested {sgsl}"),
        (["regularizer=none"], "regularizer: checkpoint {constant_l2}, requested {}"),
        (["regularizer=constant_l2", "trainer.devices=2"], "trainer.devices: checkpoint 1, requested 2"),
    ],
)
def test_resume_refuses_another_regularizer_set_or_topology(tmp_path, requested, shown):
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(compose_config(tmp_path, "regularizer=constant_l2"), resolve=True)
    with pytest.raises(ConfigError) as refused:
        resumed_config(compose_config(tmp_path, *requested), stored, overrides=None)
    assert shown in str(refused.value)


def test_a_resume_after_a_killed_process_notes_it_and_keeps_the_first_provenance(tmp_path):
    record = RunRecord(tmp_path)
    record.start(
        provenance={"host": "a", "dataset": {"listing_sha256": "1"}}, resumed_from=None, global_step=0
    )
    # killed here: run.json still says running; the next start holds the (free) lock
    again = RunRecord(tmp_path)
    again.start(provenance={"host": "b", "dataset": {"listing_sha256": "1"}}, resumed_from="x", global_step=3)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["provenance"]["host"] == "a"
    assert data["resumes"][0]["provenance_changes"] == {"host": "b"}
    assert data["resumes"][0]["previous_status"].startswith("running")
    with pytest.raises(ConfigError, match="listing_sha256 1 -> 2"):
        again.check_same_data({"dataset": {"listing_sha256": "2"}})


@pytest.mark.slow  # a multirun: `make test-slow`
def test_relaunching_a_multirun_skips_its_finished_jobs(finished, tmp_path):
    job_dir = tmp_path / "sweep" / "0"
    shutil.copytree(finished[0], job_dir)
    before = snapshot(job_dir)
    typed = command(job_dir, finished[1], "seed=0", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    typed.insert(3, "-m")  # python -m reidreg.train -m ...
    again = subprocess.run(typed, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "is finished" in (job_dir / "train.log").read_text()
    after = snapshot(job_dir)
    hydra_own = {
        name for name in before.keys() | after.keys() if name.startswith(".hydra") or name == "train.log"
    }
    assert {k: v for k, v in after.items() if k not in hydra_own} == {
        k: v for k, v in before.items() if k not in hydra_own
    }
