"""W&B logging never prompts: offline without credentials; runs grouped by method, tagged with seed, preset
and final status. Real offline runs, read back from the ``.wandb`` file W&B writes (no network)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from reidreg.train import train
from reidreg.utils.loggers import method_group, wandb_mode
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte file header, 32 KiB blocks
FULL, LAST = 1, 4  # record kinds that end a record


def wandb_records(run_dir: Path, timeout_s: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """Every record of the one offline W&B run in ``run_dir``, once W&B's writer (a separate process that
    may still be flushing when the run has finished) has written the run's exit record."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse(path.read_bytes())
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def _parse(data: bytes) -> list[wandb_internal_pb2.Record]:
    assert data[:4] == b":W&B"
    records, position, chunk = [], 7, b""
    while position + 7 <= len(data):
        if WANDB_BLOCK - position % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def run_group_tags_status(run_dir: Path) -> tuple[str, list[str], str | None]:
    """The run's group, its last tags and its summary's ``status``."""
    records = wandb_records(run_dir)
    runs = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    statuses = [
        item.value_json.strip('"')
        for record in records
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
        if item.key == "status"
    ]
    return runs[-1].run_group, list(runs[-1].tags), statuses[-1] if statuses else None


def run_json_group(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["wandb_group"]


def _offline_without_credentials(monkeypatch, tmp_path) -> None:
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def test_wandb_mode_is_offline_without_credentials_and_online_with_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_the_group_is_the_method_on_its_dataset(tiny_config):
    """Seeds and operational settings share a group; another λ, regularizer or dataset does not."""
    base = ("regularizer=constant_l2", "regularizer.constant_l2.lam=0.001")
    group, _ = method_group(tiny_config(*base))
    assert group.startswith("synthetic/constant_l2/")
    same = [
        ("seed=7",),
        ("progress.throughput_warmup_steps=3", "data.num_workers=2", "checkpoint.every_n_steps=5"),
    ]
    for overrides in same:
        assert method_group(tiny_config(*base, *overrides))[0] == group, overrides
    other = [
        ("regularizer=constant_l2", "regularizer.constant_l2.lam=0.01"),
        ("regularizer=[constant_l2,sgsl]", "regularizer.constant_l2.lam=0.001"),
        (*base, "dataset.options.num_ids=20"),
        (*base, "trainer.max_epochs=3"),
    ]
    groups = {method_group(tiny_config(*overrides))[0] for overrides in other}
    assert len(groups) == len(other) and group not in groups

    # Table III rows 1-5 all train without a regularizer: each row is a group of its own, none is "none".
    rows = [f"experiment=table3_{row}" for row in ("1_minimal", "2_triplet", "3_regional", "4_erasing")]
    row_groups = [method_group(tiny_config(row, "backbone=test_resnet"))[0] for row in rows]
    assert len(set(row_groups)) == len(rows) and all(g.startswith("synthetic/none/") for g in row_groups)


def test_finished_run_is_grouped_tagged_and_says_finished(monkeypatch, tmp_path, tiny_config, capfd):
    _offline_without_credentials(monkeypatch, tmp_path)
    cfg = tiny_config("logger=wandb", "trainer.max_epochs=1", "regularizer=[constant_l2,sgsl]", "seed=3")
    train(cfg)
    group, tags, status = run_group_tags_status(Path(cfg.paths.output_dir))
    assert group == method_group(cfg)[0] and group.startswith("synthetic/constant_l2+sgsl/")
    assert run_json_group(Path(cfg.paths.output_dir)) == group  # what reidreg.dashboard selects runs by
    assert {"dataset:synthetic", "regularizer:constant_l2+sgsl", "seed:3", "preset:none"} <= set(tags)
    assert "status:finished" in tags and status == "finished"
    assert "anonymous" not in "".join(capfd.readouterr())


def test_cli_run_of_a_preset_that_diverges_is_tagged_with_preset_and_status(tmp_path):
    """``python -m reidreg.train experiment=table3_6_l2 logger=wandb`` as typed, offline, diverging."""
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env |= {"NETRC": str(tmp_path / "no-netrc"), "WANDB_DIR": str(tmp_path)}
    command = [
        *(sys.executable, "-m", "reidreg.train", *TINY_OVERRIDES),
        *("experiment=table3_6_l2", "backbone=test_resnet", "logger=wandb", "seed=5"),
        *("optim.optimizer.lr=1e6", "optim.schedule.warmup_epochs=0", "trainer.max_epochs=1", "test=false"),
        "freeze_backbone_epochs=0",
        f"paths.data_dir={tmp_path.parent / 'data'}",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr  # diverged
    group, tags, status = run_group_tags_status(run_dir)
    assert {"preset:table3_6_l2", "seed:5", "status:diverged"} <= set(tags) and status == "diverged"
    assert group.startswith("synthetic/") and run_json_group(run_dir) == group
    assert "anonymous" not in result.stdout + result.stderr
