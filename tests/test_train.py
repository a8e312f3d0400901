"""End-to-end runs of ``reidreg.train`` on tiny synthetic data: presets, DDP, resume, multirun, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from reidreg.data import DatasetError
from reidreg.models import BackboneError
from reidreg.train import train

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


def _model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("model.", "regularizers."))}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_fast_dev_run(tiny_config, preset):
    # Evaluation batches of 8: fast_dev_run evaluates one, which must hold queries and their matches.
    overrides = ("backbone=test_resnet", "trainer.fast_dev_run=true", "data.batch_size_test=8")
    results = train(tiny_config(f"experiment={preset}", *overrides))
    assert 0.0 <= results["test/mAP"] <= 1.0


def test_full_run_writes_config_metrics_checkpoints_and_test_json(tiny_config):
    cfg = tiny_config()
    results = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert saved["test/mAP"] == pytest.approx(results["test/mAP"])
    assert set(saved) >= {"test/mAP", "test/R1", "test/R5", "test/R10", "test/mINP"}
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for column in (
        "train/loss",
        "train/global/ce",
        "train/global/triplet",
        "val/mAP",
        "test/mAP",
        "train/lr",
    ):
        assert column in header
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["reason"] is None and record["wall_time_s"] > 0
    provenance = record["provenance"]
    assert provenance["versions"]["torch"] and provenance["versions"]["lightning"]
    assert provenance["precision"] == "32-true" and provenance["seed"] == cfg.seed
    assert provenance["dataset"]["name"] == "synthetic"
    assert provenance["dataset"]["synthetic"]["num_ids"] == 16
    assert record["performance"]["peak_memory_mib"] > 0


def test_the_report_refuses_runs_in_two_precisions_unless_mixing_is_allowed(tmp_path, tiny_config):
    """Two real runs in two precisions: not comparable, unless asked for (and then marked)."""
    from reidreg.errors import ConfigError
    from reidreg.report import report

    for precision in ("32", "bf16-mixed"):
        train(tiny_config(f"trainer.precision={precision}", f"paths.output_dir={tmp_path / precision}"))
    runs = [tmp_path / "32", tmp_path / "bf16-mixed"]
    with pytest.raises(ConfigError, match="runs differ in precision: 32-true .*; bf16-mixed"):
        report(runs, out_dir=tmp_path / "report", plots=False)
    text, _ = report(runs, out_dir=tmp_path / "report", plots=False, allow_mixed=True)
    assert "Mixed comparison (--allow-mixed)" in text
    assert "runs differ in precision: 32-true" in text and "bf16-mixed" in text


def test_resume_from_last_checkpoint_ends_with_the_same_weights(tmp_path, tiny_config):
    common = ("trainer.max_epochs=2", "test=false", "trainer.check_val_every_n_epoch=1")
    uninterrupted = tiny_config(*common, f"paths.output_dir={tmp_path / 'a'}")
    train(uninterrupted)
    first_epoch = tiny_config(*common, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'b'}")
    train(first_epoch)
    resumed = tiny_config(
        *common,
        f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}",
        f"paths.output_dir={tmp_path / 'c'}",
    )
    train(resumed)
    a = _model_weights(tmp_path / "a" / "checkpoints" / "last.ckpt")
    c = _model_weights(tmp_path / "c" / "checkpoints" / "last.ckpt")
    b = _model_weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert a.keys() == c.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the second epoch did change the weights
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=0, msg=key)


def test_ddp_two_processes_give_the_same_test_metrics_as_one(tmp_path, tiny_config):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from reidreg.training.run import build_module

    cfg = tiny_config("trainer.max_epochs=1", "test=false")
    train(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    metrics = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        datamodule = instantiate(cfg.data)
        module = build_module(cfg, datamodule.num_classes, tmp_path)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            logger=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        metrics[devices] = trainer.test(
            module, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False
        )[0]
    assert metrics[1].keys() == metrics[2].keys()
    for key, value in metrics[1].items():
        assert metrics[2][key] == pytest.approx(value, abs=1e-6), key


def test_multirun_smoke(tmp_path):
    data_dir = tmp_path.parent / "data"
    from tests.conftest import TINY_OVERRIDES

    command = [
        sys.executable,
        "-m",
        "reidreg.train",
        "-m",
        *[o for o in TINY_OVERRIDES if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=1",
        "test=false",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "seed=0,1",
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()


def test_missing_dataset_root_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config(f"paths.data_dir={tmp_path / 'nowhere'}")
    cfg.dataset.name, cfg.dataset.options = "market1501", {}  # the tiny overrides are synthetic-only
    with pytest.raises(DatasetError, match="nowhere"):
        train(cfg)


def test_unknown_backbone_is_a_clear_error(tiny_config):
    cfg = tiny_config("backbone.name=resnet51")
    with pytest.raises(BackboneError, match="resnet51"):
        train(cfg)


def test_missing_weights_file_offline_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config("backbone=resnet18", f"backbone.weights_file={tmp_path / 'r18.safetensors'}")
    with pytest.raises(BackboneError, match="r18.safetensors"):
        train(cfg)


def test_unknown_config_key_is_a_clear_error(tiny_config):
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        tiny_config("trainer.max_epoch=3")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=market1501", "paths.data_dir=/nonexistent/reidreg"], "/nonexistent/reidreg"),
        (["trainer.max_epoch=3"], "trainer.max_epoch"),
        (["backbone.name=resnet51"], "resnet51"),
    ],
)
def test_command_line_reports_bad_input_in_one_line_without_traceback(tmp_path, overrides, message):
    command = [sys.executable, "-m", "reidreg.train", f"hydra.run.dir={tmp_path}", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
