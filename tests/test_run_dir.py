"""The run directory's atomic writer: the old file or the new one, never half; nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from reidreg.run_dir import TEMP_PREFIX, RunDir, atomic_write, atomic_writer, staged


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_writer(target) as file:
        file.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_staged_gives_a_temporary_path_beside_the_target(tmp_path):
    target = tmp_path / "sub" / "model.onnx"
    with staged(target) as partial:
        assert partial.parent == target.parent and partial.name.startswith(TEMP_PREFIX)
        partial.write_bytes(b"model")
    assert target.read_bytes() == b"model" and not partial.exists()


def test_run_dir_names_every_file(tmp_path):
    run = RunDir(tmp_path)
    assert run.last == tmp_path / "checkpoints" / "last.ckpt"
    assert run.csv_metrics == tmp_path / "csv" / "metrics.csv"
    assert {run.config.name, run.run_json.name, run.test_metrics.name} == {
        "config.yaml",
        "run.json",
        "test_metrics.json",
    }
