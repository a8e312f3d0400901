"""Nothing a newcomer did not ask for happens without a word: a generated dataset, the preset's accelerator,
Lightning's DDP logging warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from reidreg.data.synthetic import generate_synthetic, resolve_synthetic_options
from reidreg.utils.config import register_resolvers
from tests.conftest import CONF_DIR, TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_on_the_cpu_unless_the_command_line_chooses_a_trainer():
    """The preset chooses trainer=cpu as a default, so trainer=gpu|ddp typed by the user wins."""
    register_resolvers()
    for choice, accelerator in ((None, "cpu"), ("trainer=gpu", "gpu"), ("trainer=ddp", "gpu")):
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["experiment=quickstart", *([choice] if choice else [])])
        assert cfg.trainer.accelerator == accelerator, choice
        assert cfg.trainer.max_epochs == 15  # the preset's other trainer settings stay


def test_generating_the_synthetic_set_into_a_missing_folder_says_where_and_how_big(tmp_path, caplog):
    options = resolve_synthetic_options("tiny")
    folder = tmp_path / "typo" / options.folder_name
    with caplog.at_level("INFO", logger="reidreg.data.synthetic"):
        generate_synthetic(folder, **options.as_kwargs())
        generate_synthetic(folder, **options.as_kwargs())  # already there: nothing to say
    lines = [r.getMessage() for r in caplog.records if r.name == "reidreg.data.synthetic"]
    images = list(folder.rglob("*.jpg"))
    megabytes = sum(path.stat().st_size for path in images) / 1e6
    assert lines == [
        f"generated the synthetic dataset in {folder}: {len(images):,} images, {options.num_ids} identities "
        f"(+ distractors and junk), {options.num_cameras} cameras, {megabytes:.1f} MB; "
        f"{tmp_path / 'typo'} did not exist and was created"
    ]


@pytest.mark.slow  # a 2-process run
def test_cpu_ddp_runs_without_lightning_sync_dist_warnings(tmp_path):
    """trainer.devices=2 on the CPU, as typed: validation and test metrics are logged without Lightning's
    "It is recommended to use self.log(..., sync_dist=True)" warnings."""
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("data.num_identities", "trainer.max_epochs"))]
    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        *tiny,
        "data.num_identities=2",  # P per rank: 2 ranks share the 6 training identities
        "trainer.devices=2",
        "trainer.fast_dev_run=true",
        "data.batch_size_test=8",
        f"paths.data_dir={tmp_path.parent / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["provenance"]["device"]["count"] == 2  # two processes did run
    assert "sync_dist" not in output, output
