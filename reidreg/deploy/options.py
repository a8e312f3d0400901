"""Checks of command-line options that need no torch: bad input is reported before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reidreg.errors import ConfigError


def check_choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option}={value!r} is not one of {', '.join(choices)}.")


def check_count(option: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{option}={value!r} must be an integer >= {minimum}.")


def existing_checkpoint(value: Any) -> Path:
    """``ckpt_path`` as a path to an existing file (whether it is a reidreg checkpoint is told on loading)."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={str(path)!r} does not exist; expected a .ckpt file from reidreg.train."
        )
    return path


def output_file(option: str, value: Any, suffixes: tuple[str, ...]) -> Path:
    """An output path whose suffix is one of ``suffixes`` and that is not a folder."""
    path = Path(str(value)).expanduser()
    if path.suffix not in suffixes or path.is_dir():
        names = " or ".join(f"<file>{suffix}" for suffix in suffixes)
        raise ConfigError(f"{option}={str(path)!r} is not a supported output file here; name it {names}.")
    return path
