"""``ValidateBeforeRun``: the Hydra callback that checks a run's options and folders before Hydra creates
the run folder, so that a refused command line leaves nothing behind."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from reidreg.errors import ConfigError
from reidreg.options.check import COMMANDS, config_problems
from reidreg.options.folders import output_dir_problem, path_problems
from reidreg.options.launch import run_dir_problem
from reidreg.options.rules import raise_if_any


class ValidateBeforeRun(Callback):
    """Validate a single run's config and folders (``reidreg.options.check``) in ``on_run_start``.

    Registered in a command's config (``hydra.callbacks.validate``, with ``task: train`` or ``evaluate``).
    On a problem it prints ``error: ...`` and exits with status 2, leaving no run folder behind. In a
    multirun only the sweep folder is checked here; each job validates its own config when it starts.
    """

    def __init__(self, task: str) -> None:
        if task not in COMMANDS:
            raise ConfigError(f"ValidateBeforeRun task={task!r}: expected one of {', '.join(COMMANDS)}")
        self.task = task

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = os.path.abspath(str(config.hydra.run.dir))
        task_cfg = copy.deepcopy(config)
        problems = []
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
            # ${hydra:runtime.output_dir} is set only when Hydra creates the folder: use that folder.
            if "${hydra:" in str(OmegaConf.to_container(task_cfg.paths, resolve=False).get("output_dir")):
                task_cfg.paths.output_dir = run_dir
                output_option = "hydra.run.dir"
            else:  # outputs go elsewhere, but Hydra still creates the run folder (and writes its log there)
                output_option = "paths.output_dir"
                problems.append(output_dir_problem(run_dir, "hydra.run.dir"))
        problems += path_problems(task_cfg, output_option)
        if self.task == "train" and task_cfg.get("ckpt_path") is None:  # a resume runs in its own folder
            template = OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
            problems.append(run_dir_problem(str(template), task_cfg.trainer.get("num_nodes") or 1))
        exit_if_any(config_problems(task_cfg, self.task, extra=[p for p in problems if p]))
        if self.task == "train":
            _exit_if_run_dir_taken(str(task_cfg.paths.output_dir), task_cfg)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_if_any([p for p in [output_dir_problem(str(config.hydra.sweep.dir), "hydra.sweep.dir")] if p])


def _exit_if_run_dir_taken(run_dir: str, cfg: DictConfig) -> None:
    """A live run there: refused (status 2); this experiment's finished run: said, status 0 (see
    ``reidreg.existing_run``). Either way before Hydra writes into the directory."""
    from reidreg.existing_run import check_before_start
    from reidreg.run_dir import is_secondary_process

    if is_secondary_process():
        return
    try:
        finished = check_before_start(run_dir, cfg)
    except ConfigError as error:
        exit_if_any([str(error)])
    if finished:
        print(finished)
        sys.exit(0)


def exit_if_any(problems: list[str]) -> None:
    """Print the problems as the commands print a ConfigError (``error: ...``) and exit with status 2."""
    try:
        raise_if_any(problems)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
