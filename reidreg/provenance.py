"""What produced a run: software, code version, machine, device, precision, seed, data and command line.

A run is deterministic only within one environment: the same command gives a different mAP under another
torch, CUDA, GPU or precision, and such a shift can be as large as the effects the suite compares. So every
run records where it came from (``run.json``'s ``"provenance"``, written by ``reidreg.train``), and
``python -m reidreg.report`` refuses, or warns about, runs it compares that differ in any of it.

``collect_provenance`` returns a JSON-serialisable dict::

    {"versions": {"python", "torch", "cuda", "hip", "cudnn", "lightning", "timm", "torchvision", "numpy",
                  "reidreg"},                         # None when a package is not installed
     "packages": ["name==version", ...],              # every installed distribution, sorted
     "git": {"commit", "dirty", "patch_sha256", "patch_file", "untracked_skipped"} | None,
     "host": {"hostname", "platform", "cpu_model", "cpu_count", "cpus_available"},
     "device": {"type", "model", "count", "capability", "memory_mib"},
     "precision": "32-true" | "16-mixed" | "bf16-mixed" | ...,   # the Trainer's, as Lightning resolved it
     "numerics": {"float32_matmul_precision", "cuda_matmul_allow_tf32", "cudnn_allow_tf32",
                  "deterministic_algorithms", "cudnn_benchmark"},
     "seed": int,
     "config_sha256": SHA-256 of the run's config.yaml | None,
     "weights": {"file", "bytes", "sha256"} | None,   # the pretrained backbone's weights file, if one is used
     "dataset": DatasetSummary.as_dict(),
     "process_started_at": ISO time the process started (imports included) | None,
     "command": sys.argv}

``git`` is None unless reidreg runs from a git checkout. ``git.dirty`` is true when the checkout has
uncommitted changes (untracked, not ignored files included). The changes are kept in the run directory as
``source.patch`` (``git.patch_file``; the bytes are ``SourceState.patch``, saved by ``reidreg.train``):
the tracked changes (``git diff HEAD --binary``) followed by every untracked, not ignored file as an added
file, so that ``git apply source.patch`` on the recorded commit rebuilds the source tree the run used;
``git.patch_sha256`` is its hash (equal for two runs from the same edits). Untracked files over
``MAX_UNTRACKED_BYTES`` (data, outputs left unignored) are not copied, only
named in ``git.untracked_skipped``. ``device.model`` is the GPU's name for CUDA and the CPU's model for a CPU
run (what the speed figures depend on).

Collection is cheap next to a run: three git calls (five when dirty, plus one per untracked file), one
listing of each ``sys.path`` folder for the installed packages and, with pretrained weights, one SHA-256
of the weights file (about 0.08 s per 100 MiB on one core, so it is not cached).

``provenance_for_wandb`` flattens it, with the run's ``performance``, into ``provenance/...`` and
``performance/...`` keys for W&B's run config (the package list as one string).

Only the standard library is imported at module level; torch is imported by ``collect_provenance``, which a
training run calls anyway, and Lightning's version is read from the package metadata without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reidreg.metric_keys import PERFORMANCE
from reidreg.run_dir import PATCH_FILE, atomic_write, read_checkpoint

if TYPE_CHECKING:
    import torch

    from reidreg.data.datasets import ReIDDataset, Sample

GIT_TIMEOUT_S = 5.0
MAX_UNTRACKED_BYTES = 1 << 20  # an untracked file larger than this is named, not copied into the patch
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
    the validation hold-out (train / val_query / val_gallery) — it depends on the seed, the rest does not;
    ``held_out_ids_sha256``: SHA-256 of the sorted held-out identities (equal for runs of one seed, so that
    paired runs are known to have selected their models on the same identities). ``content_hash``: SHA-256
    of the images' bytes, from the image check (``ReIDDataModule.content_hash``; None when not computed).
    ``synthetic``: the resolved generator options (and its version) when the dataset is synthetic.
    """

    name: str
    root: str
    splits: dict[str, dict[str, int]]
    listing_sha256: str
    held_out: dict[str, dict[str, int]]
    held_out_ids_sha256: str
    content_hash: str | None = None
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
        content_hash: str | None = None,
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
            held_out_ids_sha256=_ids_sha256([*val_query, *val_gallery]),
            content_hash=content_hash,
            synthetic=synthetic,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counts(samples: Sequence[Sample]) -> dict[str, int]:
    return {"images": len(samples), "ids": len({pid for _, pid, _ in samples})}


def _ids_sha256(samples: Iterable[Sample]) -> str:
    ids = sorted({pid for _, pid, _ in samples})
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


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


def _git(args: list[str], cwd: Path, *, ok: tuple[int, ...] = (0,)) -> bytes | None:
    """``git <args>`` in ``cwd``: its stdout, or None when git is missing, fails (an exit code not in
    ``ok``) or takes too long."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            # Never take the index lock: the user may be running git in the same checkout.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode in ok else None


def source_patch(top: Path) -> tuple[bytes, list[str]] | None:
    """The uncommitted changes of the checkout at ``top`` as one patch, and the untracked files left out.

    Tracked changes (``git diff HEAD --binary``), then each untracked, not ignored file up to
    ``MAX_UNTRACKED_BYTES`` as an added file (``git diff --no-index /dev/null <file>``, which exits 1
    when it found a difference); None when git fails.
    """
    tracked = _git(["diff", "HEAD", "--binary"], top)
    listing = _git(["ls-files", "--others", "--exclude-standard", "-z"], top)
    if tracked is None or listing is None:
        return None
    parts, skipped = [tracked], []
    for name in sorted(filter(None, listing.decode(errors="surrogateescape").split("\0"))):
        path = top / name
        if not path.is_file() or path.stat().st_size > MAX_UNTRACKED_BYTES:
            skipped.append(name)
            continue
        added = _git(["diff", "--no-index", "--binary", "--", os.devnull, name], top, ok=(0, 1))
        if added is None:
            return None
        parts.append(added)
    return b"".join(parts), skipped


@dataclass(frozen=True)
class SourceState:
    """The git record of the source tree (``provenance["git"]``) and, for a dirty tree, its patch: the
    bytes the run directory keeps as ``source.patch`` (``reidreg.run_dir.PATCH_FILE``)."""

    git: dict[str, Any] | None
    patch: bytes | None = None


def source_state(source_dir: Path | None = None) -> SourceState:
    """Commit, dirty flag and patch of the git checkout that holds the reidreg package (``git`` None if
    there is none).

    None too when the package is installed (site-packages) rather than run from a checkout, even inside
    another project's repository: the package's own ``__init__.py`` must be tracked by that repository.
    """
    source_dir = source_dir or Path(__file__).resolve().parent
    if not source_dir.is_dir() or _git(["ls-files", "--error-unmatch", "__init__.py"], source_dir) is None:
        return SourceState(None)
    revision = _git(["rev-parse", "HEAD", "--show-toplevel"], source_dir)
    if revision is None:  # e.g. a repository without any commit yet
        return SourceState(None)
    commit, top = revision.decode().splitlines()
    status = _git(["status", "--porcelain"], source_dir)  # None if it timed out: dirty unknown
    git: dict[str, Any] = {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "patch_sha256": None,
        "patch_file": None,
        "untracked_skipped": [],
    }
    patch = source_patch(Path(top)) if status else None
    if patch is None:
        return SourceState(git)
    text, git["untracked_skipped"] = patch
    git.update(patch_sha256=hashlib.sha256(text).hexdigest(), patch_file=PATCH_FILE)
    return SourceState(git, text)


def save_source_patch(path: Path, patch: bytes | None, *, resumed: bool) -> None:
    """Keep a new run's patch at ``path`` (a clean tree: no file, a stale one from an earlier run in the
    folder removed). A resumed run keeps its first start's file, as ``run.json`` keeps the first start's
    provenance; a resume from other changes is noted there (``resumes[].provenance_changes.git``)."""
    if resumed:
        return
    if patch is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, patch)


def git_state(source_dir: Path | None = None) -> dict[str, Any] | None:
    """``source_state(source_dir).git``: the record alone."""
    return source_state(source_dir).git


def installed_packages() -> list[str]:
    """Every installed distribution as ``name==version`` (name normalised as PEP 503 does), sorted: what
    ``pip freeze`` lists, without pip.

    Read from the names of the ``<name>-<version>.dist-info`` (or ``.egg-info``) folders on ``sys.path``,
    the first of a name winning as in an import: under 1 ms, where reading every distribution's metadata
    with ``importlib.metadata`` takes about 0.2 s.
    """
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            stem, suffix = os.path.splitext(folder)
            if suffix in (".dist-info", ".egg-info") and "-" in stem:
                name, version = stem.split("-")[:2]
                found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), version)
    return sorted(f"{name}=={version}" for name, version in found.items())


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def weights_file_record(backbone: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pretrained weights file a backbone config loads (path, size, SHA-256); None if it loads none."""
    weights_file = backbone.get("weights_file")
    if not backbone.get("pretrained") or not weights_file:
        return None
    path = Path(weights_file).expanduser().resolve()
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def process_wall_time_s() -> float | None:
    """Seconds since this process started, imports included; None where the kernel does not say (off
    Linux).

    From the kernel's record of the process: its start in clock ticks since boot (``/proc/self/stat``
    field 22) against the clock since boot (``CLOCK_BOOTTIME``, the one it is counted on), so no module has
    to take a timestamp before its imports. Resolution: one clock tick (10 ms).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, AttributeError):
        return None
    # Fields after the command name, which is in parentheses and may itself hold spaces or parentheses.
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return round(now - ticks / os.sysconf("SC_CLK_TCK"), 2)


def tested_checkpoint(path: str | Path | None, *, epoch: int, global_step: int) -> dict[str, int]:
    """Which weights the test used: the epoch (0-based) and global step stored in checkpoint ``path``, or,
    without one (no validation hold-out, so no best checkpoint), those of the final weights."""
    if not path:
        return {"epoch": epoch, "global_step": global_step}
    stored = read_checkpoint(path)
    return {"epoch": int(stored["epoch"]), "global_step": int(stored["global_step"])}


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
    config_text: str | None = None,
    source: SourceState | None = None,
) -> dict[str, Any]:
    """Everything that identifies where a run's numbers came from (layout in the module docstring).

    ``cfg``: the run's config (for its seed). ``dataset``: the data it trained and was tested on.
    ``precision``: the Trainer's resolved precision (``trainer.precision``, e.g. ``"32-true"``), not the
    config value. ``device``: the device this process trains on (``trainer.strategy.root_device``);
    ``num_devices``: how many devices train together (``trainer.world_size``). Call it once the Trainer is
    built: Lightning sets the numerics (``trainer.deterministic``) when it is constructed. ``config_text``:
    the ``config.yaml`` the run writes (hashed). ``source``: ``source_state()``, when the caller keeps its
    patch (computed here otherwise). Nothing is written: the caller saves the patch once the run may write.
    """
    import torch

    age = process_wall_time_s()
    started = None if age is None else datetime.fromtimestamp(time.time() - age, UTC)
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": torch.version.hip,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            **{name: package_version(*dists) for name, dists in VERSIONED_PACKAGES.items()},
        },
        "packages": installed_packages(),
        "git": (source or source_state()).git,
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
        "config_sha256": None if config_text is None else hashlib.sha256(config_text.encode()).hexdigest(),
        "weights": weights_file_record(cfg.get("backbone") or {}),
        "dataset": dataset.as_dict() if isinstance(dataset, DatasetSummary) else dict(dataset),
        "process_started_at": None if started is None else started.isoformat(timespec="seconds"),
        "command": list(sys.argv),
    }


def provenance_for_wandb(
    provenance: Mapping[str, Any], performance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Flat ``provenance/<section>/<key>`` (and ``performance/<key>``) entries for W&B's config/summary.

    Nested sections are joined with ``/``; the command line becomes one shell-quoted string, the package
    list one space-separated string. Either part
    may be empty: the provenance is known when training starts, the performance when it ends.
    """
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner)
        elif prefix == "provenance/command" and isinstance(value, list):
            flat[prefix] = shlex.join(map(str, value))
        elif prefix == "provenance/packages" and isinstance(value, list):
            flat[prefix] = " ".join(value)
        else:
            flat[prefix] = value

    if provenance:
        add("provenance", dict(provenance))
    if performance:
        add(PERFORMANCE, dict(performance))
    return flat
