"""``reidreg.provenance``: what a run records about where its numbers came from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reidreg.data import build_dataset
from reidreg.data.datamodule import hold_out_identities
from reidreg.provenance import (
    MAX_UNTRACKED_BYTES,
    DatasetSummary,
    collect_provenance,
    git_state,
    installed_packages,
    provenance_for_wandb,
    save_source_patch,
    source_state,
)
from reidreg.train import train

TINY = {"preset": "tiny"}


def _summary(root: Path, *, seed: int = 0, **options) -> DatasetSummary:
    options = {**TINY, **options}
    dataset = build_dataset("synthetic", root, verbose=False, **options)
    train, val_query, val_gallery = hold_out_identities(dataset.train, 2, seed)
    return DatasetSummary.of(
        dataset, train=train, val_query=val_query, val_gallery=val_gallery, options=options
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def test_collect_provenance_on_this_machine(data_root):
    dataset = _summary(data_root)
    cfg = OmegaConf.create({"seed": 7, "trainer": {"precision": 32}})
    provenance = collect_provenance(cfg, dataset=dataset, precision="32-true", device="cpu", num_devices=1)
    assert json.loads(json.dumps(provenance)) == provenance  # JSON-serialisable as is

    versions = provenance["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["cuda"] == torch.version.cuda
    assert versions["cudnn"] == (
        torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    )
    assert versions["numpy"] == np.__version__
    import pytorch_lightning
    import timm
    import torchvision

    assert versions["lightning"] == pytorch_lightning.__version__
    assert versions["timm"] == timm.__version__
    assert versions["torchvision"] == torchvision.__version__.split("+")[0]  # the package's, no build tag
    assert isinstance(versions["reidreg"], str)

    host = provenance["host"]
    assert host["hostname"] and isinstance(host["hostname"], str)
    assert host["platform"] == platform.platform()
    assert host["cpu_count"] == os.cpu_count() and 1 <= host["cpus_available"] <= host["cpu_count"]
    assert isinstance(host["cpu_model"], str) and host["cpu_model"]

    assert provenance["device"] == {
        "type": "cpu",
        "model": host["cpu_model"],  # a CPU run's speed depends on the CPU
        "count": 1,
        "capability": None,
        "memory_mib": None,
    }
    assert provenance["precision"] == "32-true"
    assert provenance["numerics"]["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert provenance["numerics"]["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert provenance["seed"] == 7
    assert provenance["command"] == sys.argv
    assert provenance["dataset"] == dataset.as_dict()
    # The tests run from a git checkout of reidreg (the package's own __init__.py is tracked).
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    assert provenance["git"]["commit"] == head.strip()
    assert isinstance(provenance["git"]["dirty"], bool)


def test_dataset_summary_counts_options_and_fingerprint(data_root, tmp_path):
    summary = _summary(data_root, seed=0)
    dataset = build_dataset("synthetic", data_root, verbose=False, **TINY)
    assert summary.name == "synthetic"
    assert summary.root == str(Path(dataset.root).resolve())
    assert summary.splits == {
        split: {"images": len(samples), "ids": len({pid for _, pid, _ in samples})}
        for split, samples in (
            ("train", dataset.train),
            ("query", dataset.query),
            ("gallery", dataset.gallery),
        )
    }
    held = summary.held_out
    assert held["val_query"]["ids"] == 2  # data.val_identities=2
    assert sum(held[split]["images"] for split in held) == len(dataset.train)
    assert summary.synthetic == {
        "generator_version": 1,
        "preset": "tiny",
        "num_ids": 12,
        "num_cameras": 3,
        "images_per_id": 6,
        "height": 64,
        "width": 32,
        "seed": 0,
        "num_distractors": 6,
        "num_junk": 3,
        "mislabeled_percent": 0,
    }

    # The fingerprint names the files, not where the folder is, and not the seed's hold-out.
    moved = tmp_path / "elsewhere"
    shutil.copytree(data_root, moved)
    assert _summary(moved).listing_sha256 == summary.listing_sha256
    assert _summary(moved, seed=1).listing_sha256 == summary.listing_sha256
    # The held-out identities are the seed's: the same for one seed wherever the data is, else not.
    assert _summary(moved).held_out_ids_sha256 == summary.held_out_ids_sha256
    assert _summary(data_root, seed=1).held_out_ids_sha256 != summary.held_out_ids_sha256
    assert summary.content_hash is None  # given by the image check, not computed here
    # ... but another generator option is another dataset.
    assert _summary(data_root, num_distractors=3).listing_sha256 != summary.listing_sha256

    # A real dataset (not synthetic) has no generator options; a file fewer changes the fingerprint.
    folder = Path(dataset.root)
    market = build_dataset("market1501", folder, verbose=False)
    full = DatasetSummary.of(market, train=market.train, val_query=[], val_gallery=[])
    assert full.synthetic is None and full.splits == summary.splits
    victim = sorted((folder / "bounding_box_test").iterdir())[-1]
    copy = tmp_path / "market"
    shutil.copytree(folder, copy)
    (copy / "bounding_box_test" / victim.name).unlink()
    smaller = build_dataset("market1501", copy, verbose=False)
    fewer = DatasetSummary.of(smaller, train=smaller.train, val_query=[], val_gallery=[])
    assert fewer.listing_sha256 != full.listing_sha256


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository with one commit holding a package ``pkg/`` (``pkg/__init__.py`` tracked)."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text('"""pkg."""\n')
    (repo / "pkg" / "module.py").write_text("X = 1\n")
    (repo / ".gitignore").write_text("outputs/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return repo


def test_git_commit_and_dirty_flag_in_a_checkout(checkout):
    package = checkout / "pkg"
    clean = git_state(package)
    assert clean == {
        "commit": _git(checkout, "rev-parse", "HEAD"),
        "dirty": False,
        "patch_sha256": None,
        "patch_file": None,
        "untracked_skipped": [],
    }

    (checkout / "outputs").mkdir()
    (checkout / "outputs" / "run.json").write_text("{}")  # ignored files do not make it dirty
    assert git_state(package) == clean

    (package / "module.py").write_text("X = 2\n")
    edited = git_state(package)
    assert edited["commit"] == clean["commit"] and edited["dirty"] is True
    assert len(edited["patch_sha256"]) == 64
    assert git_state(package) == edited  # the same edit, the same fingerprint
    (package / "module.py").write_text("X = 3\n")
    assert git_state(package)["patch_sha256"] != edited["patch_sha256"]  # another edit, another one

    (package / "module.py").write_text("X = 1\n")
    (package / "new_regularizer.py").write_text("Y = 1\n")  # untracked code counts
    untracked = git_state(package)
    assert untracked["dirty"] is True and untracked["patch_sha256"] != edited["patch_sha256"]
    (package / "new_regularizer.py").write_text("Y = 2\n")  # ... with its content
    assert git_state(package)["patch_sha256"] != untracked["patch_sha256"]


def test_the_saved_patch_rebuilds_the_dirty_tree_on_its_commit(checkout, tmp_path):
    """``git apply source.patch`` on a clean clone at the recorded commit gives the files the run used:
    tracked edits, deletions, new text and binary files (in subfolders too); not ignored or oversized
    files."""
    package = checkout / "pkg"
    (package / "module.py").write_text("X = 2  # edited\n")
    (checkout / ".gitignore").unlink()  # a tracked file deleted ...
    (checkout / ".gitignore").write_text("outputs/\n*.log\n")  # ... and rewritten
    (package / "sub").mkdir()
    (package / "sub" / "new.py").write_text("Z = 'ü'\n")
    (package / "table.bin").write_bytes(bytes(range(256)) * 4)
    (checkout / "outputs").mkdir()
    (checkout / "outputs" / "checkpoint.ckpt").write_bytes(b"ignored")
    (checkout / "train.log").write_text("ignored\n")
    (checkout / "big.csv").write_bytes(b"1," * (MAX_UNTRACKED_BYTES // 2 + 1))

    source = source_state(package)
    state, patch = source.git, source.patch
    assert state["patch_file"] == "source.patch" and state["untracked_skipped"] == ["big.csv"]
    assert hashlib.sha256(patch).hexdigest() == state["patch_sha256"]
    assert b"checkpoint.ckpt" not in patch and b"train.log" not in patch and b"big.csv" not in patch
    patch_file = tmp_path / "run" / "source.patch"
    patch_file.parent.mkdir()
    save_source_patch(patch_file, patch, resumed=False)
    save_source_patch(patch_file, b"other changes", resumed=True)  # a resume keeps the first start's

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(checkout), str(clone))
    _git(clone, "checkout", "-q", state["commit"])
    _git(clone, "apply", str(patch_file))
    for path in ("pkg/module.py", ".gitignore", "pkg/sub/new.py", "pkg/table.bin"):
        assert (clone / path).read_bytes() == (checkout / path).read_bytes(), path
    save_source_patch(patch_file, None, resumed=False)  # a new run from a clean tree: no stale patch
    assert not patch_file.exists()


def test_no_git_gives_null(checkout, tmp_path, monkeypatch, data_root):
    # A package outside any repository, or inside one that does not track it (installed into a venv there).
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "__init__.py").write_text("")
    assert git_state(tmp_path / "plain") is None
    venv_package = checkout / "outputs" / "site-packages" / "pkg"
    venv_package.mkdir(parents=True)
    (venv_package / "__init__.py").write_text("")
    assert git_state(venv_package) is None
    # git not installed at all
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    assert git_state(checkout / "pkg") is None
    provenance = collect_provenance(
        {"seed": 0}, dataset=_summary(data_root), precision="32-true", device="cpu", num_devices=1
    )
    assert provenance["git"] is None


def test_cuda_device_is_named_by_torch(monkeypatch, data_root):
    """The CUDA branch with torch.cuda's answers replaced (no GPU here): name, capability and memory."""

    class Properties:
        major, minor, total_memory = 9, 0, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H100 80GB HBM3 #{index}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties)
    provenance = collect_provenance(
        {"seed": 0},
        dataset={"name": "x"},
        precision="bf16-mixed",
        device=torch.device("cuda", 1),
        num_devices=4,
    )
    assert provenance["device"] == {
        "type": "cuda",
        "model": "NVIDIA H100 80GB HBM3 #1",
        "count": 4,
        "capability": "9.0",
        "memory_mib": 81920,
    }
    assert provenance["precision"] == "bf16-mixed" and provenance["dataset"] == {"name": "x"}


def test_flat_keys_for_wandb():
    provenance = {
        "versions": {"torch": "2.14.1", "cuda": None},
        "git": None,
        "precision": "32-true",
        "dataset": {"name": "synthetic", "splits": {"train": {"images": 36, "ids": 6}}},
        "command": ["-m", "reidreg.train", "regularizer=[adaptive_l2,sgsl]"],
        "packages": ["numpy==2.4.6", "torch==2.14.1"],
    }
    flat = provenance_for_wandb(provenance, {"train_img_per_s": 120.5, "peak_memory_mib": None})
    assert flat == {
        "provenance/versions/torch": "2.14.1",
        "provenance/versions/cuda": None,
        "provenance/git": None,
        "provenance/precision": "32-true",
        "provenance/dataset/name": "synthetic",
        "provenance/dataset/splits/train/images": 36,
        "provenance/dataset/splits/train/ids": 6,
        "provenance/command": "-m reidreg.train 'regularizer=[adaptive_l2,sgsl]'",
        "provenance/packages": "numpy==2.4.6 torch==2.14.1",
        "performance/train_img_per_s": 120.5,
        "performance/peak_memory_mib": None,
    }
    assert provenance_for_wandb({}, {"train_img_per_s": 1.5}) == {"performance/train_img_per_s": 1.5}


def test_importing_it_loads_neither_torch_nor_lightning():
    code = "import sys, reidreg.provenance; print(sorted({'torch', 'pytorch_lightning'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "[]"


def test_the_report_finds_every_field_it_compares(data_root):
    from reidreg.reporting.environment import FIELDS, HELD_OUT, MIXING_FIELDS, UNKNOWN, value_of

    provenance = collect_provenance(
        {"seed": 0}, dataset=_summary(data_root), precision="32-true", device="cpu", num_devices=1
    )
    compared = (*FIELDS, *MIXING_FIELDS, HELD_OUT)
    assert [field.label for field in compared if value_of(provenance, field) == UNKNOWN] == []


def test_installed_packages_are_those_importlib_metadata_knows():
    normalised = {
        f"{re.sub(r'[-_.]+', '-', dist.name).lower()}=={dist.version}"
        for dist in importlib.metadata.distributions()
    }
    assert installed_packages() == sorted(normalised)


def test_process_wall_time_counts_from_the_process_start():
    """A process that sleeps 1 s before importing reidreg reports at least that second."""
    code = "import time; time.sleep(1.0); import reidreg.provenance as p; print(p.process_wall_time_s())"
    before = time.monotonic()
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert 1.0 <= float(output.stdout) <= time.monotonic() - before + 0.02  # 10 ms clock ticks


def test_a_real_run_records_what_reproduces_it(tiny_config, tmp_path):
    """One tiny run with pretrained weights from a file: every reproduction field in run.json, the
    tested checkpoint in test_metrics.json too."""
    import timm

    weights = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    cfg = tiny_config("backbone.pretrained=true", f"backbone.weights_file={weights}", "trainer.max_epochs=1")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    record = json.loads((run_dir / "run.json").read_text())
    provenance = record["provenance"]

    assert provenance["config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert provenance["weights"] == {
        "file": str(weights.resolve()),
        "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    packages = provenance["packages"]
    assert packages == sorted(packages) and f"numpy=={np.__version__}" in packages
    assert any(package.startswith("torch==") for package in packages)
    assert len(provenance["dataset"]["held_out_ids_sha256"]) == 64
    git = provenance["git"]  # the tests run from a checkout; a dirty one keeps its patch
    if git["dirty"]:
        patch = (run_dir / "source.patch").read_bytes()
        assert git["patch_file"] == "source.patch"
        assert hashlib.sha256(patch).hexdigest() == git["patch_sha256"]
    else:
        assert git["patch_file"] is None and not (run_dir / "source.patch").exists()

    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    tested = {"epoch": best["epoch"], "global_step": best["global_step"]}
    assert record["tested_checkpoint"] == tested and tested["epoch"] == 0 and tested["global_step"] > 0
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert (metrics["checkpoint_epoch"], metrics["checkpoint_global_step"]) == tuple(tested.values())
    # The whole process (here: pytest's) is older than the run itself.
    assert record["performance"]["process_wall_time_s"] >= record["wall_time_s"]


def test_without_a_hold_out_the_final_weights_are_tested_and_recorded(tiny_config):
    cfg = tiny_config("data.val_identities=0", "trainer.max_epochs=2")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["tested_checkpoint"] == {"epoch": 1, "global_step": last["global_step"]}
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["checkpoint"] == "final weights (no validation hold-out)"
    assert (metrics["checkpoint_epoch"], metrics["checkpoint_global_step"]) == (1, last["global_step"])
