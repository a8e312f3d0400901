"""A real signal at a chosen phase of a real run, for tests: a Lightning callback loaded by entry point.

Lightning adds the callbacks of every ``pytorch_lightning.callbacks_factory`` entry point to each Trainer.
``install(folder)`` writes a distribution's metadata declaring ``callbacks_from_environment`` as one;
a ``python -m reidreg.train`` started with ``folder`` on ``PYTHONPATH`` and
``REIDREG_TEST_SIGNAL=<hook>:<n>:<signal>`` sends ``<signal>`` to its own process (rank 0) at the
``n``-th call of the callback hook ``<hook>`` (``on_validation_batch_start``, ...). The hook
``checkpoint_write`` sends it from inside the ``n``-th checkpoint's serialization, in the middle of the
file being written. The product code knows nothing of it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

ENVIRONMENT = "REIDREG_TEST_SIGNAL"
ENTRY_POINT = (
    "[pytorch_lightning.callbacks_factory]\nphase_signal = tests.phase_signals:callbacks_from_environment\n"
)


def install(folder: Path) -> Path:
    """Declare the entry point in ``folder`` (put it on ``PYTHONPATH``); returns ``folder``."""
    info = folder / "reidreg_phase_signal-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: reidreg-phase-signal\nVersion: 0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINT)
    return folder


def environment(folder: Path, hook: str, n: int, name: str) -> dict[str, str]:
    """The environment variables that make a run started now signal itself at ``hook`` call ``n``."""
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, ENVIRONMENT: f"{hook}:{n}:{name}"}


def callbacks_from_environment() -> list[pl.Callback]:
    spec = os.environ.get(ENVIRONMENT)
    if not spec:
        return []
    hook, n, name = spec.split(":")
    return [SignalAt(hook, int(n), signal.Signals[name])]


class _SignalWhenPickled:
    def __init__(self, number: signal.Signals) -> None:
        self.number = number

    def __reduce__(self) -> tuple:
        os.kill(os.getpid(), self.number)
        return (int, ())


class SignalAt(pl.Callback):
    """Sends ``number`` to its own process at the ``n``-th call of ``hook`` (rank 0 only)."""

    def __init__(self, hook: str, n: int, number: signal.Signals) -> None:
        self.hook, self.n, self.number, self.calls = hook, n, number, 0
        setattr(self, "on_save_checkpoint" if hook == "checkpoint_write" else hook, self._call)

    def _call(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        self.calls += 1
        if self.calls != self.n:
            return
        if self.hook == "checkpoint_write":
            args[0]["signal_while_written"] = _SignalWhenPickled(self.number)
        else:
            os.kill(os.getpid(), self.number)
