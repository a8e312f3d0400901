"""Command-line glue: user errors become one clear line (no traceback); metric tables are printed.

Only Hydra, OmegaConf and the standard library are imported here: the CLI entry modules import this
before the config is composed.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from reidreg.errors import ReIDRegError, RunStopped, message_of
from reidreg.options.check import (
    CONF_DIR,
    known_keys,
    selected_regularizers,
    unselected_regularizer_option,
)
from reidreg.options.rules import raise_if_any, unknown_option
from reidreg.run_dir import LOCK_FILE, is_secondary_process
from reidreg.utils.console import FILE_ONLY_LOGGER

log = logging.getLogger(__name__)
_NOT_IN_CONFIG = re.compile(r"Could not override '([^']+)'")


def command(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main`` of the command ``python -m reidreg.<config_name>`` (conf/<config_name>.yaml).

    An override Hydra cannot compose is one ``error:`` line, exit status 2, instead of Hydra's report: an
    unknown key gets "did you mean ...", a regularizer's option the ``regularizer=`` to add, every unknown
    key of the command line at once. (Hydra prints its own report unless ``HYDRA_FULL_ERROR`` is set; it is
    set here so that the error reaches this wrapper.) A multirun job's input error, logged by ``run_cli``,
    ends the sweep with its exit status and no traceback.
    """

    def decorate(task_function: Callable[[Any], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(
            task_function
        )

        @functools.wraps(task_function)
        def main() -> Any:
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
            try:
                return hydra_main()
            except ReIDRegError as error:  # a multirun job's, logged by run_cli: the sweep stops there
                sys.exit(error.exit_code)
            except (ConfigCompositionException, OverrideParseException) as error:
                overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]
                try:
                    raise_if_any(composition_problems(error, config_name, overrides))
                except ReIDRegError as problem:
                    print(f"error: {problem}", file=sys.stderr)
                    sys.exit(2)

        return main

    return decorate


def composition_problems(error: Exception, config_name: str, overrides: list[str]) -> list[str]:
    """What Hydra's composition ``error`` means for the user, one line per problem.

    Every override of a key that is not in the config is found (composing again without it, a sweep
    taken at its first value), and named with the closest known key of the config the others compose.
    """
    unknown: list[str] = []
    remaining = _first_of_sweeps(overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        while match := _NOT_IN_CONFIG.search(str(error)):
            unknown.append(match.group(1))
            kept = [override for override in remaining if _override_key(override) != unknown[-1]]
            if kept == remaining:
                break
            remaining = kept
            try:
                cfg = compose(config_name, overrides=remaining)
            except (ConfigCompositionException, OverrideParseException) as again:
                error = again
            else:
                selected, known = selected_regularizers(cfg), known_keys(cfg, config_name)
                return [
                    unselected_regularizer_option(k, selected) or unknown_option(k, known) for k in unknown
                ]
    return [_one_line(error)]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """``seed=0,1`` → ``seed=0``: a multirun's sweeps as the first job composes them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return overrides
    return [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
        for o in parsed
    ]


def _one_line(error: Exception) -> str:
    """Hydra's multi-line message on one line; a missing group option lists the available ones."""
    if isinstance(error, MissingConfigException) and error.options and "/" in str(error.missing_cfg_file):
        group, name = str(error.missing_cfg_file).rsplit("/", 1)
        close = difflib.get_close_matches(name, error.options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={name}: no such option; expected one of {', '.join(error.options)}{hint}"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{error.override}: {text}" if isinstance(error, OverrideParseException) else text


def run_cli(task: Callable[..., Any], cfg: Any, **kwargs: Any) -> Any:
    """Run ``task(cfg, **kwargs)``; bad input is reported as ``error: <message>``, exit status 2.

    Errors that end a run for a known reason (a divergence, a signal) exit with their own status (3, 4).
    In a multirun the error is logged (into the job's log, which ``reidreg.report`` shows) and re-raised,
    so that Hydra marks this job failed and goes on with the others. A single run that failed before
    writing anything leaves no run directory behind (only Hydra's own files were in it).
    """
    try:
        return task(cfg, **kwargs)
    except (ReIDRegError, OmegaConfBaseException) as error:
        message = message_of(error)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("error: %s", message)
            raise
        run_log = logging.getLogger(FILE_ONLY_LOGGER)
        if run_log.handlers:  # the run's log file keeps it too (extract and export have none)
            run_log.error("error: %s", message)
        if not (isinstance(error, RunStopped) and is_secondary_process()):  # all ranks stop: rank 0 says it
            print(f"error: {message}", file=sys.stderr)
        remove_unused_run_dir()
        sys.exit(getattr(error, "exit_code", 2))


def remove_unused_run_dir() -> None:
    """Delete Hydra's run directory if it holds nothing but Hydra's own files (``.hydra/``, the job log)
    and the lock of a run that never began.

    A folder without ``.hydra/`` is not one Hydra made for this run (extract and export run in the
    working directory): it is left alone.
    """
    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log", LOCK_FILE}
    if (run_dir / ".hydra").is_dir() and {path.name for path in run_dir.iterdir()} <= hydra_files:
        shutil.rmtree(run_dir, ignore_errors=True)


def continue_logging_in(run_dir: Path) -> None:
    """A resumed run continues in its original directory: its job log there gets this session's lines.

    Hydra made a fresh directory for this invocation; its log handler is moved to ``run_dir`` (appending)
    and the fresh directory, which then holds only Hydra's files, is removed, so that the run stays one
    directory (as ``reidreg.report`` counts runs).
    """
    if not HydraConfig.initialized():
        return
    fresh = Path(HydraConfig.get().runtime.output_dir).resolve()
    if fresh == run_dir.resolve():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
            moved = logging.FileHandler(run_dir / Path(handler.baseFilename).name, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
    log.info("Resuming in the run's own directory %s", run_dir)
    remove_unused_run_dir()


def print_metrics_table(title: str, metrics: Mapping[str, float], keys: Iterable[str]) -> None:
    """A small aligned table of ``<split>/<key>`` metrics, as percentages (logged: console and log file)."""
    values = {key: value for key in keys for name, value in metrics.items() if name.endswith(f"/{key}")}
    header = "  ".join(f"{key:>7s}" for key in values)
    row = "  ".join(f"{100 * value:7.2f}" for value in values.values())
    log.info("%s\n  %s\n  %s", title, header, row)
