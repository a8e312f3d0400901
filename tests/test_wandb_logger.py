"""W&B logging never prompts: offline without credentials, runs grouped by regularizer and tagged."""

from __future__ import annotations

from pathlib import Path

from reidreg.train import train
from reidreg.utils.loggers import wandb_mode


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


def test_training_with_wandb_logger_runs_offline_without_credentials(monkeypatch, tmp_path, tiny_config):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = tiny_config("logger=wandb", "trainer.fast_dev_run=true", "regularizer=[constant_l2,sgsl]")
    assert cfg.logger.wandb.group == "constant_l2+sgsl"
    assert "dataset:synthetic" in cfg.logger.wandb.tags
    train(cfg)
    offline_runs = list(Path(cfg.paths.output_dir).glob("wandb/offline-run-*"))
    assert offline_runs, "expected an offline W&B run in the run directory"
