"""Folders and files a command names, probed before any work without leaving anything behind.

The output folder must be creatable and writable with at least ``MIN_FREE_OUTPUT_BYTES`` free; the data
folder must be readable, and writable with ``MIN_FREE_DATA_BYTES`` free where the synthetic dataset is
still to be generated there; ``ckpt_path`` must be a file; an output file must not be a folder. A probe
file is created and removed at once; nothing else is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reidreg.options.rules import raise_if_any, show

GIB = 1024**3
MIB = 1024**2
# Free space below which a run is refused: a guard against a full disk, not a budget. A paper-recipe
# checkpoint (ResNet-50 + regional branches + Adam's state) takes 0.89 GiB on Market-1501 (751 classes),
# 1.04 GiB on MSMT17, and a run keeps two (last, best). The default synthetic dataset takes 14 MB.
MIN_FREE_OUTPUT_BYTES = 1 * GIB
MIN_FREE_DATA_BYTES = 100 * MIB


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a file, if a file stands in the way)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _writable_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (probed with a file removed at once), or None."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".reidreg-write-probe-", dir=folder)
    except OSError as error:
        return f"not writable ({error.strerror or error})"
    os.close(handle)
    os.unlink(probe)
    return None


def _free_space_problem(folder: Path, min_free_bytes: int, purpose: str) -> str | None:
    free = shutil.disk_usage(folder).free
    if free >= min_free_bytes:
        return None
    return (
        f"only {free / GIB:.2f} GiB free on its file system, at least {min_free_bytes / GIB:.2f} GiB "
        f"needed ({purpose})"
    )


def _folder_problem(
    path: str | Path, option: str, *, write: bool, min_free_bytes: int, purpose: str
) -> str | None:
    """Why ``path`` cannot be used as a folder (to be created if missing, when ``write``), or None."""
    target = Path(path).expanduser().absolute()
    existing = _nearest_existing(target)
    if not existing.is_dir():
        problem = f"{str(existing)!r} is a file, not a folder"
    elif not write:
        if existing != target:  # missing: left to the dataset loader, whose error names the layout
            return None
        try:
            with os.scandir(existing):
                problem = None
        except OSError as error:
            problem = f"not readable ({error.strerror or error})"
    else:
        problem = _writable_problem(existing) or _free_space_problem(existing, min_free_bytes, purpose)
        if problem and existing != target:
            problem += f" (its closest existing folder is {str(existing)!r})"
    return f"{option}={show(str(path))}: {problem}" if problem else None


def output_dir_problem(
    path: str | Path, option: str, min_free_bytes: int = MIN_FREE_OUTPUT_BYTES
) -> str | None:
    return _folder_problem(
        path, option, write=True, min_free_bytes=min_free_bytes, purpose="checkpoints, logs and metrics"
    )


def _data_dir_problem(
    path: str | Path, option: str, needs_write: bool, min_free_bytes: int = MIN_FREE_DATA_BYTES
) -> str | None:
    return _folder_problem(
        path, option, write=needs_write, min_free_bytes=min_free_bytes, purpose="the synthetic dataset"
    )


def check_output_dir(
    path: str | Path, option: str = "paths.output_dir", *, min_free_bytes: int = MIN_FREE_OUTPUT_BYTES
) -> None:
    """``path`` is (or can be created as) a writable folder with ``min_free_bytes`` free; else ConfigError.

    Nothing is created: a missing folder is probed through its closest existing ancestor.
    """
    raise_if_any([p for p in [output_dir_problem(path, option, min_free_bytes)] if p])


def check_data_dir(
    path: str | Path,
    option: str = "paths.data_dir",
    *,
    needs_write: bool,
    min_free_bytes: int = MIN_FREE_DATA_BYTES,
) -> None:
    """The data folder is readable, and writable with ``min_free_bytes`` free when ``needs_write``.

    When nothing is to be written, a data folder that does not exist is left to the dataset loader: its
    error names the layout it expected.
    """
    raise_if_any([p for p in [_data_dir_problem(path, option, needs_write, min_free_bytes)] if p])


def synthetic_needs_generation(data_dir: str | Path, options: Mapping[str, Any]) -> bool:
    """True unless the synthetic dataset of ``options`` is already complete under ``data_dir``.

    The folder is the one ``reidreg.data.datasets.build_dataset("synthetic", data_dir, **options)`` reads.
    """
    from reidreg.data.synthetic import is_complete, resolve_synthetic_options  # numpy and PIL, no torch

    root = Path(data_dir).expanduser()
    name = resolve_synthetic_options(**options).folder_name
    return not is_complete(root if root.name == name else root / name)


def _dataset_needs_write(cfg: DictConfig) -> bool:
    dataset = OmegaConf.select(cfg, "dataset", default=None)
    if not isinstance(dataset, DictConfig) or dataset.get("name") != "synthetic":
        return False  # real datasets are only read
    try:
        return synthetic_needs_generation(
            cfg.paths.data_dir, OmegaConf.to_container(dataset.options, resolve=True)
        )
    except (
        TypeError,
        ValueError,
    ):  # invalid options, reported by the config check: assume it is to be written
        return True


def _checkpoint_problem(path: Any, option: str = "ckpt_path") -> str | None:
    if not isinstance(path, str) or Path(path).expanduser().is_file():
        return None  # null, or not a string (reported by the config check)
    return f"{option}={show(path)}: does not exist; expected a checkpoint of reidreg.train (a .ckpt file)"


def _output_file_problem(path: Any, option: str = "out") -> str | None:
    if isinstance(path, str) and Path(path).expanduser().is_dir():
        return f"{option}={show(path)}: is a folder; expected a file name"
    return None


def path_problems(cfg: DictConfig, output_option: str = "paths.output_dir") -> list[str]:
    """Problems of the files and folders a command's config names: ``ckpt_path``; the output and data
    folders (``paths``: train, evaluate); the output file (``out``: extract, export)."""
    problems = [_checkpoint_problem(OmegaConf.select(cfg, "ckpt_path", default=None, throw_on_missing=False))]
    if "paths" in cfg:
        problems.append(output_dir_problem(cfg.paths.output_dir, output_option))
        problems.append(_data_dir_problem(cfg.paths.data_dir, "paths.data_dir", _dataset_needs_write(cfg)))
    if "out" in cfg:
        problems.append(_output_file_problem(OmegaConf.select(cfg, "out", throw_on_missing=False)))
    return [problem for problem in problems if problem]


def check_paths(cfg: DictConfig) -> None:
    """The files and folders of a command's config (``path_problems``), in one ConfigError.

    An evaluate config without ``dataset`` tests on the checkpoint's dataset, unknown here: its data folder
    is then checked for reading only.
    """
    raise_if_any(path_problems(cfg))
