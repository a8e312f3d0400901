"""What an experiment is: the options that change what a run computes, as opposed to how it runs.

One definition serves the three places that need it:

* resume (``reidreg.training.resume``) lets an override change an operational option, or one that only
  lengthens or re-tests the run (``RESUME_ADJUSTABLE``), and refuses any other;
* the report (``reidreg.reporting.methods``) names a method by its non-operational options, so that a run
  with another progress display, worker count or checkpoint cadence is a repeat of the same method;
* the W&B group (``reidreg.utils.loggers``) is that method, so repeats land together.

A key is operational when it equals, or lies inside, one of ``OPERATIONAL``. The seed is neither: it is
the experiment's replicate, not its method (``method_settings`` leaves it, and every option set from it,
out). Only the standard library is imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

#: Where and how a run runs, what it shows and records: never what it computes.
OPERATIONAL = (
    "task_name",
    "ckpt_path",
    "test",
    "paths",
    "logger",
    "hydra",
    "progress",
    "checkpoint.every_n_steps",
    "checkpoint.signals",
    "checkpoint.requeue",
    "divergence",
    "distributed",
    "data.root",
    "data.num_workers",
    "data.batch_size_test",
    "data.verify_images",
    "trainer.accelerator",  # the device class is the environment's (the report refuses to mix them)
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
)
#: Options that change the numbers, but that a resumed run may still change: its length (to extend it),
#: the final test's re-ranking, and the devices (resume checks that the number of processes, hence the
#: global batch, stays the same). Two runs that differ in them are different methods.
RESUME_ADJUSTABLE = (
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.fast_dev_run",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "evaluation.rerank",
)
SEED_KEY = "seed"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def is_operational(key: str) -> bool:
    """``key`` (dotted) never changes what a run computes."""
    return _under(key, OPERATIONAL)


def resume_may_change(key: str) -> bool:
    """A resumed run may set ``key`` to another value than its checkpoint's."""
    return _under(key, OPERATIONAL) or _under(key, RESUME_ADJUSTABLE)


def method_settings(flat: Mapping[str, Any], seed_derived: Iterable[str] = ()) -> dict[str, Any]:
    """The options of a flattened config that make its method: all but the operational ones, the seed
    and the keys in ``seed_derived`` (options set from the seed, such as ``data.seed: ${seed}``)."""
    left_out = {SEED_KEY, *seed_derived}
    return {key: value for key, value in flat.items() if key not in left_out and not is_operational(key)}


def method_hash(settings: Mapping[str, Any]) -> str:
    """SHA-256 of ``method_settings`` (JSON, sorted keys): equal for every seed of one method."""
    text = json.dumps(dict(settings), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
