"""Rules between options of one command, and the synthetic dataset's own option check.

Each relation runs only when the options it reads passed their own rules (``valid``: key → value): the
frozen-backbone epochs and ``trainer.max_epochs``, the triplet loss's P and K, the regional stripes and the
image height; dropping wrong validation labels needs synthetic data; the trainer's topology and the launch
environment (``reidreg.options.launch``); an FGSM attack is one step; an export file's suffix names its
format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from reidreg.options.launch import launch_problems
from reidreg.options.rules import show, unknown_option
from reidreg.options.tables import EXPORT_FORMATS


def dataset_options_problems(valid: Mapping[str, Any]) -> list[str]:
    """``dataset.options``: a real dataset's by name, the synthetic set's by the generator's own check."""
    if "dataset.name" not in valid or "dataset.options" not in valid:
        return []
    name, options = valid["dataset.name"], valid["dataset.options"]
    if name != "synthetic":
        from reidreg.data.datasets import _REAL_DATASET_OPTIONS  # standard library only

        known = [f"dataset.options.{key}" for key in _REAL_DATASET_OPTIONS[name]]
        return [
            unknown_option(f"dataset.options.{key}", known)
            for key in options
            if key not in _REAL_DATASET_OPTIONS[name]
        ]
    from reidreg.data.synthetic import resolve_synthetic_options  # numpy and PIL, no torch

    try:
        resolve_synthetic_options(**options)
    except (TypeError, ValueError) as error:
        return [f"dataset.options={show(options)}: {error}"]
    return []


def feature_rows(height: int, *, last_stride_one: bool) -> int:
    """Rows of a ResNet's last feature map for images ``height`` pixels high (stride 16, or 32)."""
    return math.ceil(height / (16 if last_stride_one else 32))


def stripes_cut(rows: int, num_stripes: int) -> int:
    """How many stripes ``torch.chunk(num_stripes)`` actually gives for ``rows`` rows (may be fewer)."""
    return math.ceil(rows / math.ceil(rows / num_stripes)) if rows >= 1 else 0


def train_relation_problems(valid: Mapping[str, Any]) -> list[str]:
    """Rules between options; each runs only when the options it reads passed their own rules."""
    problems = []

    def have(*keys: str) -> bool:
        return all(key in valid for key in keys)

    if have("freeze_backbone_epochs", "trainer.max_epochs") and not valid.get("trainer.fast_dev_run"):
        frozen, epochs = valid["freeze_backbone_epochs"], valid["trainer.max_epochs"]
        if frozen >= epochs:  # (a fast_dev_run smoke test runs one batch whatever the epochs)
            problems.append(
                f"freeze_backbone_epochs={frozen}: expected an integer in [0, trainer.max_epochs={epochs}) "
                "(the whole network must train for at least one epoch)"
            )
    if valid.get("loss.triplet") is True:
        for key, needs in (("data.num_identities", "negatives"), ("data.num_instances", "positives")):
            if key in valid and valid[key] < 2:
                problems.append(
                    f"{key}={valid[key]}: expected an integer >= 2 with loss.triplet=true (the batch-hard "
                    f"triplet loss needs {needs} in every batch), or set loss.triplet=false"
                )
    if valid.get("model.regional_branches") is True and have(
        "data.height", "model.num_stripes", "backbone.last_stride_one"
    ):
        stride = 16 if valid["backbone.last_stride_one"] else 32
        rows = feature_rows(valid["data.height"], last_stride_one=valid["backbone.last_stride_one"])
        wanted = valid["model.num_stripes"]
        if stripes_cut(rows, wanted) != wanted:
            possible = [n for n in range(1, rows + 1) if stripes_cut(rows, n) == n]
            problems.append(
                f"model.num_stripes={wanted}: data.height={valid['data.height']} gives a feature map of "
                f"{rows} rows (height / {stride}), which cuts into {stripes_cut(rows, wanted)} stripes, not "
                f"{wanted}; expected one of {', '.join(map(str, possible))} (or a larger data.height)"
            )
    if (
        valid.get("data.val_drop_mislabeled") is True
        and valid.get("dataset.name", "synthetic") != "synthetic"
    ):
        problems.append(
            f"data.val_drop_mislabeled=true: expected false with dataset={valid['dataset.name']} (only the "
            "synthetic dataset knows which of its training labels are wrong)"
        )
    return problems + launch_problems(valid)


def evaluate_relation_problems(valid: Mapping[str, Any]) -> list[str]:
    problems = []
    if valid.get("attack.name") == "fgsm" and valid.get("attack.steps") not in (None, 1):
        problems.append(f"attack.steps={valid['attack.steps']}: expected 1 or null (fgsm is a single step)")
    if valid.get("attack.random_start") is False and valid.get("attack.eps", 0) > 0:
        problems.append(
            "attack.random_start=false: expected true (the distance to the clean embedding has zero "
            "gradient at the clean image: without a random start the attack would not move)"
        )
    return problems


def export_relation_problems(valid: Mapping[str, Any]) -> list[str]:
    if "format" not in valid or "out" not in valid:
        return []
    suffixes = EXPORT_FORMATS[valid["format"]]
    if PurePath(valid["out"]).suffix in suffixes:
        return []
    names = " or ".join(f"<file>{suffix}" for suffix in suffixes)
    return [f"out={show(valid['out'])}: expected a file named {names} (format={valid['format']})"]
