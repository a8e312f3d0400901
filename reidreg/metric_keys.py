"""The keys runs log their metrics under: one definition for the trainer, its loggers (CSV, W&B),
``test_metrics.json``, the report and the dashboard.

- ``val/<metric>`` and ``test/<metric>`` for every metric of ``REPORTED_METRICS`` (``metric_key``); the
  epoch is logged as ``epoch``;
- ``reg/<regularizer>/<key>`` for what a regularizer logs (``regularizer_key``); adaptive L2's median λ of
  a parameter category is ``reg/<name>/lambda_median/<category>`` (AdaptiveReID Fig. 3);
- ``performance/<key>`` in W&B's summary for run.json's ``performance`` (``train_img_per_s``,
  ``peak_memory_mib``, ...).
"""

from __future__ import annotations

import re

REPORTED_METRICS = ("mAP", "R1", "R5", "R10", "mINP")
VAL, TEST = "val", "test"
EPOCH = "epoch"
LAMBDA_MEDIAN = "lambda_median"
PERFORMANCE = "performance"
IMG_PER_S, PEAK_MEMORY_MIB = "train_img_per_s", "peak_memory_mib"  # keys of run.json's performance


def metric_key(split: str, metric: str) -> str:
    """``val/mAP``, ``test/R1``, ..."""
    return f"{split}/{metric}"


def regularizer_key(regularizer: str, key: str) -> str:
    """``reg/<regularizer>/<key>``: the logged name of a regularizer's value."""
    return f"reg/{regularizer}/{key}"


def performance_key(key: str) -> str:
    """``performance/<key>``: a run.json performance figure in W&B's summary."""
    return f"{PERFORMANCE}/{key}"


# reg/<name>/lambda_median/<category>, for any adaptive L2 regularizer name (no regex metacharacters in
# the fixed parts).
LAMBDA_MEDIAN_KEY = re.compile(
    "^" + regularizer_key("(?P<regularizer>[^/]+)", LAMBDA_MEDIAN) + "/(?P<category>.+)$"
)
