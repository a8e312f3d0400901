"""``python -m reidreg.evaluate ckpt_path=... [dataset=...] [rerank=true] [attack=fgsm]``.

Evaluates a checkpoint of ``reidreg.train`` on a test set: by default the one it was trained for; with
``dataset=<name>`` another one (cross-domain). The network and image settings are rebuilt from the
config stored in the checkpoint. Optionally: k-reciprocal re-ranking, a ranked-list image (query + top-k
gallery, green/red borders as Fig. 5 of the AdaptiveReID paper), and an adversarial attack on the query
images that reports clean and attacked metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from reidreg.utils.cli import command, run_cli
from reidreg.utils.config import register_resolvers

register_resolvers()


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; writes ``eval_metrics.json`` (and images) into the run directory.

    The work is in ``reidreg.evaluation.checkpoint_eval`` (torch and the model load only from here on).
    """
    from reidreg.options.check import validate_before_work

    validate_before_work(cfg, "evaluate")
    from reidreg.evaluation.checkpoint_eval import evaluate_checkpoint as run

    return run(cfg)


@command("evaluate")
def main(cfg: DictConfig) -> None:
    logging.captureWarnings(True)
    run_cli(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    main()
