"""What a run shows: progress lines, validation lines, throughput, model summary, the run's log file."""

from __future__ import annotations

import io
import logging
import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reidreg.training.callbacks.progress import (
    CompactModelSummary,
    ProgressLines,
    ValidationSummary,
    console_callbacks,
    format_duration,
    resolve_progress_mode,
)
from reidreg.training.callbacks.throughput import ThroughputMonitor, batch_size
from reidreg.utils.console import FILE_ONLY_LOGGER, DropLightningAds, StdoutHandler

REPO = Path(__file__).resolve().parents[1]
PROGRESS_LOGGER = "reidreg.training.callbacks.progress"
LINE = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<max_epochs>\d+)  step (?P<step>\d+)/(?P<batches>\d+)  global (?P<global>\d+)"
    r"  loss (?P<loss>[\d.]+)  (?P<img_s>[\d.]+) img/s  ETA (?P<eta>\d+:\d\d:\d\d)"
)


class FakeClock:
    """A clock that only the test moves; counts its reads (= CUDA synchronisation points of the monitor)."""

    def __init__(self) -> None:
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingTensor(torch.Tensor):
    """A 0-dim loss tensor that counts how often it is read on the host."""

    reads = 0

    def __float__(self) -> float:
        CountingTensor.reads += 1
        return super().__float__()


class TinyModule(pl.LightningModule):
    """A linear classifier; logs a scripted validation mAP/R1/mINP per validation; exposes last_step_loss."""

    def __init__(
        self,
        val_maps=(0.5, 0.7, 0.6),
        *,
        batches: int = 6,
        batch: int = 8,
        clock: FakeClock | None = None,
        step_seconds: float = 0.0,
        validation_batch_seconds: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.val_maps, self.batches, self.batch = list(val_maps), batches, batch
        self.clock, self.step_seconds, self.validation_batch_seconds = (
            clock,
            step_seconds,
            validation_batch_seconds,
        )
        self.last_step_loss: torch.Tensor | None = None
        self.losses: dict[int, float] = {}  # global step after the step → its loss, for the test only

    def _loader(self, n: int) -> DataLoader:
        generator = torch.Generator().manual_seed(n)
        data = TensorDataset(
            torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)
        )
        return DataLoader(data, batch_size=self.batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.batches * self.batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(2 * self.batch)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self.layer(images), labels)
        self.last_step_loss = loss.detach().as_subclass(CountingTensor)
        self.losses[self.global_step + 1] = loss.item()
        if self.clock is not None:
            self.clock.advance(self.step_seconds)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.clock is not None:
            self.clock.advance(self.validation_batch_seconds)

    def on_validation_epoch_end(self) -> None:
        value = self.val_maps[self.current_epoch]
        self.log_dict({"val/mAP": value, "val/R1": value + 0.1, "val/mINP": value - 0.1})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, tmp_path, callbacks, *, max_epochs=2, ckpt_path=None, checkpointing=False) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def messages(caplog, logger: str = PROGRESS_LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def progress_cfg(mode="auto", every_n_steps=4, every_n_seconds=None, warmup=2) -> dict:
    return {
        "mode": mode,
        "every_n_steps": every_n_steps,
        "every_n_seconds": every_n_seconds,
        "throughput_warmup_steps": warmup,
    }


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------- mode


def test_auto_mode_is_the_bar_in_a_terminal_and_lines_otherwise():
    assert resolve_progress_mode("auto", FakeTerminal()) == "bar"
    assert resolve_progress_mode("auto", io.StringIO()) == "lines"
    for mode in ("bar", "lines", "off"):
        assert resolve_progress_mode(mode, io.StringIO()) == mode


def test_callbacks_per_mode():
    def kinds(mode, **kwargs):
        callbacks = console_callbacks(progress_cfg(mode=mode), stream=io.StringIO(), **kwargs)
        return {type(c).__name__: c for c in callbacks}

    lines = kinds("auto", monitor="val/mAP")
    assert set(lines) == {"ThroughputMonitor", "ValidationSummary", "ProgressLines", "CompactModelSummary"}
    assert lines["ProgressLines"].logger.name == PROGRESS_LOGGER
    assert lines["ProgressLines"].throughput is lines["ThroughputMonitor"]  # one measurement for both
    bar = kinds("bar", monitor=None, model_summary=False)
    assert set(bar) == {"ThroughputMonitor", "ProgressLines", "RichProgressBar"}
    assert bar["ProgressLines"].logger.name == FILE_ONLY_LOGGER  # the bar on the console, lines in the file
    assert set(kinds("off", monitor=None, model_summary=False)) == {"ThroughputMonitor"}
    composed = OmegaConf.create(progress_cfg(mode="lines", every_n_seconds=300))  # as cfg.progress gives it
    assert len(console_callbacks(composed, monitor=None, model_summary=False)) == 2


# ---------------------------------------------------------------------------------------------- lines


def test_progress_lines_every_n_steps_with_loss_speed_and_eta(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    CountingTensor.reads = 0
    module = TinyModule(batches=6)
    callbacks = console_callbacks(
        progress_cfg(every_n_steps=4, warmup=2), monitor="val/mAP", stream=io.StringIO()
    )
    fit(module, tmp_path, callbacks, max_epochs=2)

    lines = [LINE.fullmatch(m) for m in messages(caplog) if m.startswith("epoch") and " step " in m]
    assert all(lines), messages(caplog)
    # every 4th of the run's 12 steps: step 4 of epoch 1, steps 2 and 6 of epoch 2
    got = [(int(m["epoch"]), int(m["step"]), int(m["global"])) for m in lines]
    assert got == [(1, 4, 4), (2, 2, 8), (2, 6, 12)]
    for m in lines:
        assert (m["max_epochs"], m["batches"]) == ("2", "6")
        assert float(m["loss"]) == pytest.approx(module.losses[int(m["global"])], abs=1e-4)
        assert float(m["img_s"]) > 0
    assert CountingTensor.reads == len(lines)  # the loss is read on the host only when a line is printed
    assert lines[-1]["eta"] == "0:00:00"  # the last step of the run


def test_time_fallback_prints_a_line_when_steps_are_slow(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    module = TinyModule(batches=6, clock=clock, step_seconds=4.0)
    lines = ProgressLines(
        ThroughputMonitor(warmup_steps=0), every_n_steps=1000, every_n_seconds=10, clock=clock
    )
    fit(module, tmp_path, [lines], max_epochs=2)
    steps = [int(re.search(r"global (\d+)", m)[1]) for m in messages(caplog) if "global" in m]
    assert steps == [3, 6, 9, 12]  # 4 s per step: a line once 10 s have passed since the last


def test_eta_counts_steps_and_validations_left(tmp_path):
    clock = FakeClock()
    monitor = ThroughputMonitor(warmup_steps=0, clock=clock)
    lines = ProgressLines(monitor, every_n_steps=1000, every_n_seconds=None)
    etas = []

    class RecordEta(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:  # 2 steps of 4 epochs × 6 done after this
                etas.append(lines.eta_seconds(trainer, batch_idx, step_s=0.5))

    module = TinyModule(val_maps=[0.1] * 4, batches=6, clock=clock, validation_batch_seconds=1.5)
    fit(module, tmp_path, [monitor, lines, RecordEta()], max_epochs=4)
    # 6 × 4 - 8 = 16 steps × 0.5 s, plus 3 validations left (epochs 2, 3, 4) × (2 batches × 1.5 s)
    assert monitor.mean_validation_seconds == pytest.approx(3.0)
    assert etas == [pytest.approx(16 * 0.5 + 3 * 3.0)]


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3723.4) == "1:02:03"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"


# ---------------------------------------------------------------------------------------------- validation


def test_validation_lines_with_best_so_far_agree_with_the_best_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    best_ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/mAP", mode="max")
    summary = ValidationSummary("val/mAP")
    fit(
        TinyModule(val_maps=(0.5, 0.7, 0.6)), tmp_path, [summary, best_ckpt], max_epochs=3, checkpointing=True
    )
    assert messages(caplog) == [
        "epoch 1/3  val mAP 50.00 %  R1 60.00 %  mINP 40.00 %  (best 50.00 % @ epoch 1)",
        "epoch 2/3  val mAP 70.00 %  R1 80.00 %  mINP 60.00 %  (best 70.00 % @ epoch 2)",
        "epoch 3/3  val mAP 60.00 %  R1 70.00 %  mINP 50.00 %  (best 70.00 % @ epoch 2)",
    ]
    assert float(best_ckpt.best_model_score) == pytest.approx(summary.best)
    assert f"epoch={summary.best_epoch - 1}" in best_ckpt.best_model_path  # Lightning counts from 0


def test_best_so_far_survives_a_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    def last():
        return pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)

    fit(TinyModule(val_maps=(0.5, 0.7)), tmp_path, [ValidationSummary(), last()], checkpointing=True)
    caplog.clear()
    resumed = [ValidationSummary(), last()]  # a new callback: its best comes from the checkpoint
    module = TinyModule(val_maps=(0.5, 0.7, 0.6))
    fit(module, tmp_path, resumed, max_epochs=3, ckpt_path=tmp_path / "last.ckpt", checkpointing=True)
    assert messages(caplog) == [
        "epoch 3/3  val mAP 60.00 %  R1 70.00 %  mINP 50.00 %  (best 70.00 % @ epoch 2)"
    ]


# ---------------------------------------------------------------------------------------------- throughput


def test_throughput_excludes_warmup_epoch_boundaries_and_validation(tmp_path):
    clock = FakeClock()
    monitor = ThroughputMonitor(warmup_steps=2, clock=clock)
    module = TinyModule(batches=6, batch=8, clock=clock, step_seconds=0.01, validation_batch_seconds=1.0)
    fit(module, tmp_path, [monitor], max_epochs=2)
    # epoch 1: 2 warm-up batches, the 3rd opens the window, 3 counted; epoch 2: the 1st opens it, 5 counted
    assert (monitor.steps, monitor.images) == (8, 64)
    assert monitor.seconds == pytest.approx(8 * 0.01)  # the 2 s of validation are not in it
    assert monitor.validations == 2 and monitor.mean_validation_seconds == pytest.approx(2.0)
    summary = monitor.summary()
    assert summary["train_ms_per_step"] == pytest.approx(10.0)
    assert summary["train_img_per_s"] == pytest.approx(800.0)
    # the clock (a CUDA sync on GPU) is read at window and validation boundaries only, not per step
    assert clock.reads == 8


def test_throughput_summary_is_positive_and_consistent_with_a_real_clock(tmp_path):
    monitor = ThroughputMonitor(warmup_steps=1)
    fit(TinyModule(batches=6, batch=8), tmp_path, [monitor], max_epochs=2)
    summary = monitor.summary()
    assert set(summary) == {"train_img_per_s", "train_ms_per_step", "peak_memory_mib", "memory_kind"}
    assert summary["train_img_per_s"] > 0 and summary["train_ms_per_step"] > 0
    assert summary["train_img_per_s"] * summary["train_ms_per_step"] / 1000 == pytest.approx(8.0)
    assert summary["memory_kind"] == "process_peak_rss"  # on CPU: this process's peak RSS
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 0 < summary["peak_memory_mib"] <= peak_mib


def test_a_run_shorter_than_the_warmup_has_no_speed(tmp_path):
    monitor = ThroughputMonitor(warmup_steps=100)
    fit(TinyModule(batches=6), tmp_path, [monitor], max_epochs=1)
    summary = monitor.summary()
    assert summary["train_img_per_s"] is None and summary["train_ms_per_step"] is None
    assert summary["peak_memory_mib"] > 0


def test_batch_size_of_nested_batches():
    images = torch.zeros(12, 3, 8, 4)
    assert batch_size(images) == 12
    assert batch_size((images, torch.zeros(12))) == 12
    assert batch_size({"meta": [], "x": [images]}) == 12


# ------------------------------------------------------------------------------------ summary, logging


def test_compact_model_summary_is_logged_without_flops(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    fit(TinyModule(), tmp_path, [CompactModelSummary()], max_epochs=1)
    (summary,) = [m for m in messages(caplog) if m.startswith("Model:")]
    assert summary.splitlines() == ["Model: 15 parameters, 15 trainable, 0.000 MB", "  layer  Linear  15"]
    assert "FLOPs" not in capsys.readouterr().out


def test_stdout_handler_follows_sys_stdout(capsys):
    handler = StdoutHandler()
    logger = logging.getLogger("reidreg.test_stdout_handler")
    logger.addHandler(handler)
    try:
        replaced = io.StringIO()
        sys.stdout, original = replaced, sys.stdout  # what Rich's live bar does while it is shown
        try:
            logger.warning("above the bar")
        finally:
            sys.stdout = original
    finally:
        logger.removeHandler(handler)
    assert replaced.getvalue() == "above the bar\n"


def test_lightning_ads_are_dropped_and_its_other_messages_kept(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    unfiltered: list[logging.LogRecord] = []
    raw = logging.Handler()
    raw.emit = unfiltered.append
    handler.addFilter(DropLightningAds())
    lightning = logging.getLogger("pytorch_lightning")
    lightning.addHandler(handler)
    lightning.addHandler(raw)
    try:
        fit(TinyModule(), tmp_path, [], max_epochs=1)
    finally:
        lightning.removeHandler(handler)
        lightning.removeHandler(raw)
    assert any("litlogger" in r.getMessage() for r in unfiltered)  # Lightning did advertise
    assert not any("Tip" in r.getMessage() for r in records)
    assert any("GPU available" in r.getMessage() for r in records)
    ours = logging.LogRecord("reidreg.x", logging.INFO, __file__, 1, "💡 Tip: ours", None, None)
    assert DropLightningAds().filter(ours)


def _log_lines(text: str) -> list[str]:
    """The messages of console log lines (``[HH:MM:SS][LEVEL] message``)."""
    return re.findall(r"^\[\d\d:\d\d:\d\d\]\[[A-Z]+\] (.*)$", text, flags=re.MULTILINE)


def test_cli_log_file_holds_the_console_and_lightning_messages(tmp_path):
    from tests.conftest import train_command

    run_dir = tmp_path / "run"
    command = train_command(run_dir, tmp_path.parent / "data", "+trainer.limit_train_batches=2", "test=false")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log_file = (run_dir / "train.log").read_text()
    console = _log_lines(result.stdout)
    for expected in ("GPU available", "`Trainer.fit` stopped", "Run directory"):
        assert any(expected in line for line in console), result.stdout
    for line in console:
        assert f"] - {line}" in log_file
    assert "Tip:" not in result.stdout + result.stderr + log_file


HYDRA_SCRIPT = """
import logging, sys, warnings
import hydra
from omegaconf import OmegaConf
sys.path.insert(0, {tests!r})
sys.path.insert(0, {repo!r})
from test_progress import TinyModule, fit, progress_cfg
from reidreg.training.callbacks.progress import console_callbacks
from reidreg.utils.console import FILE_ONLY_LOGGER

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    logging.captureWarnings(True)
    callbacks = console_callbacks(progress_cfg(every_n_steps=3, warmup=0), monitor="val/mAP")
    fit(TinyModule(), {tmp!r}, callbacks, max_epochs=2)
    logging.getLogger(FILE_ONLY_LOGGER).info("for the file only")
    warnings.warn("a python warning")

main()
"""


def test_progress_and_validation_lines_reach_console_and_log_file_outside_a_terminal(tmp_path):
    script = tmp_path / "run_tiny.py"
    script.write_text(
        textwrap.dedent(HYDRA_SCRIPT).format(
            tests=str(REPO / "tests"), repo=str(REPO), conf=str(REPO / "conf"), tmp=str(tmp_path)
        )
    )
    run_dir = tmp_path / "run"
    command = [sys.executable, str(script), f"hydra.run.dir={run_dir}", "hydra.job.name=train"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # stdout: a pipe
    assert result.returncode == 0, result.stderr
    console = _log_lines(result.stdout)
    log_file = (run_dir / "train.log").read_text()
    assert sum(bool(LINE.fullmatch(line)) for line in console) == 4  # steps 3, 6, 9, 12
    assert sum("val mAP" in line for line in console) == 2
    assert any(line.startswith("Model:") for line in console)
    assert any("a python warning" in line for line in console)
    for line in console:
        assert f"] - {line}" in log_file
    assert "for the file only" in log_file and "for the file only" not in result.stdout
