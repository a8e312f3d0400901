"""What produced a run: software, code version, machine, device, precision, seed, data and command line.

A run is deterministic only within one environment: the same command gives a different mAP under another
torch, CUDA, GPU or precision, and such a shift can be as large as the effects the suite compares. So every
run records where it came from (``run.json``'s ``"provenance"``, written by ``reidreg.train``), and
``python -m reidreg.report`` warns when the runs it compares differ in any of it.

``collect_provenance`` returns a JSON-serialisable dict::

    {"versions": {"python", "torch", "cuda", "hip", "cudnn", "lightning", "timm", "torchvision", "numpy",
                  "reidreg"},                         # None when a package is not installed
     "git": {"commit", "dirty", "diff_sha256"} | None,  # None unless reidreg runs from a git checkout
     "host": {"hostname", "platform", "cpu_model", "cpu_count", "cpus_available"},
     "device": {"type", "model", "count", "capability", "memory_mib"},
     "precision": "32-true" | "16-mixed" | "bf16-mixed" | ...,   # the Trainer's, as Lightning resolved it
     "numerics": {"float32_matmul_precision", "cuda_matmul_allow_tf32", "cudnn_allow_tf32",
                  "deterministic_algorithms", "cudnn_benchmark"},
     "seed": int,
     "dataset": DatasetSummary.as_dict(),
     "command": sys.argv}

``git.dirty`` is true when the checkout has uncommitted changes (untracked, not ignored files included);
``git.diff_sha256`` then fingerprints them (``git diff HEAD`` and ``git status --porcelain``), so that two
runs from the same dirty checkout can still be told apart from two runs with different edits. ``device.model``
is the GPU's name for CUDA and the CPU's model for a CPU run (what the speed figures depend on).

``provenance_for_wandb`` flattens it, with the run's ``performance``, into ``provenance/...`` and
``performance/...`` keys for W&B's run config.

Only the standard library is imported at module level; torch is imported by ``collect_provenance``, which a
training run calls anyway, and Lightning's version is read from the package metadata without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from reidreg.data.datasets import ReIDDataset, Sample

GIT_TIMEOUT_S = 5.0
# Package whose version is recorded -> its distribution names (the first one installed is used).
VERSIONED_PACKAGES: dict[str, tuple[str, ...]] = {
    "lightning": ("pytorch-lightning", "lightning"),
    "timm": ("timm",),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "reidreg": ("reidreg",),
}


@dataclass(frozen=True)
class DatasetSummary:
    """Which data a run saw.

    ``splits``: images and identities of train / query / gallery as on disk; ``listing_sha256``: SHA-256
    of every split's listing (file name relative to ``root``, pid, camera), a fingerprint of which files
    the dataset has (not of their bytes). ``held_out``: what the run trained and selected models on after
    the validation hold-out (train / val_query / val_gallery) — it depends on the seed, the rest does not.
    ``synthetic``: the resolved generator options (and its version) when the dataset is synthetic.
    """

    name: str
    root: str
    splits: dict[str, dict[str, int]]
    listing_sha256: str
    held_out: dict[str, dict[str, int]]
    synthetic: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        dataset: ReIDDataset,
        *,
        train: Sequence[Sample],
        val_query: Sequence[Sample],
        val_gallery: Sequence[Sample],
        options: Mapping[str, Any] | None = None,
    ) -> DatasetSummary:
        """The summary of ``dataset`` as loaded, with the splits the run used after its hold-out."""
        on_disk = {"train": dataset.train, "query": dataset.query, "gallery": dataset.gallery}
        used = {"train": train, "val_query": val_query, "val_gallery": val_gallery}
        synthetic = None
        if dataset.name == "synthetic":
            from reidreg.data.synthetic import GENERATOR_VERSION, resolve_synthetic_options

            resolved = resolve_synthetic_options(**dict(options or {}))
            preset = (options or {}).get("preset", "quickstart")
            synthetic = {"generator_version": GENERATOR_VERSION, "preset": preset, **resolved.as_kwargs()}
        return cls(
            name=dataset.name,
            root=str(Path(dataset.root).resolve()),
            splits={split: _counts(samples) for split, samples in on_disk.items()},
            listing_sha256=_listing_sha256(dataset.root, on_disk),
            held_out={split: _counts(samples) for split, samples in used.items()},
            synthetic=synthetic,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counts(samples: Sequence[Sample]) -> dict[str, int]:
    return {"images": len(samples), "ids": len({pid for _, pid, _ in samples})}


def _listing_sha256(root: str | Path, splits: Mapping[str, Iterable[Sample]]) -> str:
    prefix = str(root).rstrip(os.sep) + os.sep
    digest = hashlib.sha256()
    for split, samples in splits.items():
        for path, pid, camid in samples:
            digest.update(f"{split}\t{path.removeprefix(prefix)}\t{pid}\t{camid}\n".encode())
    return digest.hexdigest()


def package_version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` that is installed, None if none is."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(args: list[str], cwd: Path) -> str | None:
    """``git <args>`` in ``cwd``: its stdout, or None when git is missing, fails or takes too long."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            # Never take the index lock: the user may be running git in the same checkout.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_state(source_dir: Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout that holds the reidreg package, None if there is none.

    None too when the package is installed (site-packages) rather than run from a checkout, even inside
    another project's repository: the package's own ``__init__.py`` must be tracked by that repository.
    """
    source_dir = source_dir or Path(__file__).resolve().parent
    if not source_dir.is_dir() or _git(["ls-files", "--error-unmatch", "__init__.py"], source_dir) is None:
        return None
    commit = _git(["rev-parse", "HEAD"], source_dir)
    if commit is None:  # e.g. a repository without any commit yet
        return None
    status = _git(["status", "--porcelain"], source_dir)  # None if it timed out: dirty unknown
    diff = _git(["diff", "HEAD", "--binary"], source_dir) if status else None
    return {
        "commit": commit.strip(),
        "dirty": None if status is None else bool(status),
        "diff_sha256": hashlib.sha256((status + (diff or "")).encode()).hexdigest() if status else None,
    }


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _device_info(device: torch.device | str, count: int) -> dict[str, Any]:
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "type": device.type,
        "model": None,
        "count": count,
        "capability": None,
        "memory_mib": None,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        info |= {
            "model": torch.cuda.get_device_name(index),
            "capability": f"{properties.major}.{properties.minor}",
            "memory_mib": round(properties.total_memory / 2**20),
        }
    elif device.type == "cpu":
        info["model"] = cpu_model()
    else:  # mps, xpu, ...: the machine is the best name there is
        info["model"] = f"{device.type} on {platform.machine()}"
    return info


def collect_provenance(
    cfg: Mapping[str, Any],
    *,
    dataset: DatasetSummary | Mapping[str, Any],
    precision: str,
    device: torch.device | str,
    num_devices: int,
) -> dict[str, Any]:
    """Everything that identifies where a run's numbers came from (layout in the module docstring).

    ``cfg``: the run's config (for its seed). ``dataset``: the data it trained and was tested on.
    ``precision``: the Trainer's resolved precision (``trainer.precision``, e.g. ``"32-true"``), not the
    config value. ``device``: the device this process trains on (``trainer.strategy.root_device``);
    ``num_devices``: how many devices train together (``trainer.world_size``). Call it once the Trainer is
    built: Lightning sets the numerics (``trainer.deterministic``) when it is constructed.
    """
    import torch

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": torch.version.hip,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            **{name: package_version(*dists) for name, dists in VERSIONED_PACKAGES.items()},
        },
        "git": git_state(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "device": _device_info(device, num_devices),
        "precision": str(precision),
        "numerics": {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "seed": cfg.get("seed"),
        "dataset": dataset.as_dict() if isinstance(dataset, DatasetSummary) else dict(dataset),
        "command": list(sys.argv),
    }


def provenance_for_wandb(
    provenance: Mapping[str, Any], performance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Flat ``provenance/<section>/<key>`` (and ``performance/<key>``) entries for W&B's config/summary.

    Nested sections are joined with ``/``; the command line becomes one shell-quoted string. Either part
    may be empty: the provenance is known when training starts, the performance when it ends.
    """
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner)
        elif prefix == "provenance/command" and isinstance(value, list):
            flat[prefix] = shlex.join(map(str, value))
        else:
            flat[prefix] = value

    if provenance:
        add("provenance", dict(provenance))
    if performance:
        add("performance", dict(performance))
    return flat
