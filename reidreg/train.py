"""``python -m reidreg.train [overrides]``: train, validate, test and log one ReID model.

``main`` is a thin ``@hydra.main`` wrapper (``reidreg.utils.cli.command``); ``train(cfg)`` is the plain
function tests call directly.
Only Hydra and OmegaConf load before the config is composed and validated, so a typo in an override or
``--help`` is answered in seconds; torch, Lightning and timm load afterwards.

Reading order for a newcomer: ``train`` → ``reidreg.training.run`` (resume, build, check, fit, test) →
``reidreg.data.datamodule`` → ``reidreg.models.ReIDModel`` → ``reidreg.training.ReIDModule.training_step``
→ ``reidreg.evaluation``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from reidreg.utils.cli import command, run_cli
from reidreg.utils.config import register_resolvers

register_resolvers()


def train(cfg: DictConfig, *, overrides: Sequence[str] | None = None) -> dict[str, float]:
    """Train and (unless ``cfg.test`` is false) test; returns the test metrics and ``val/best_mAP``.

    ``overrides``: the command-line overrides the config was composed with. A resumed run
    (``ckpt_path``) applies only those that keep the checkpoint's experiment; without them (a config built
    in Python) the whole config must match the checkpoint's experiment.
    """
    from reidreg.options.check import validate_before_work

    validate_before_work(cfg, "train")  # every option and folder, before any work (no torch yet)
    from reidreg.training.run import run_training  # torch, Lightning, timm

    return run_training(cfg, overrides, compose=_compose_flat if overrides is not None else None)


def __getattr__(name: str) -> Any:
    """``reidreg.train.build_module`` and ``build_trainer`` (in ``reidreg.training.run``), imported on first
    use: importing this module must not load torch (PEP 562 module attribute)."""
    if name in ("build_module", "build_trainer"):
        from reidreg.training import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _compose_flat(overrides: Sequence[str]) -> dict:
    """The unresolved config ``python -m reidreg.train`` composes with ``overrides``, flattened."""
    from hydra.core.hydra_config import HydraConfig

    from reidreg.utils.config import flatten

    config = hydra.compose(HydraConfig.get().job.config_name, overrides=list(overrides))
    return flatten(OmegaConf.to_container(config, resolve=False))


@command("train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from reidreg.utils.ranks import follow_main_process

    follow_main_process()  # a DDP rank the launcher started: dies with the main process, prints once
    logging.captureWarnings(True)  # warnings reach the run's log file too
    results = run_cli(train, cfg, overrides=list(HydraConfig.get().overrides.task))
    # For sweepers that optimise a value (the Optuna L2 search): the validation mAP of the best checkpoint,
    # never a test metric, so that a search does not select on the test set.
    return results.get("val/best_mAP")


if __name__ == "__main__":
    main()
