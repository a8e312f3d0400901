"""``reidreg.extract``: embeddings of image files, equal to evaluation's, and clear errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reidreg.data.datamodule import ReIDDataModule
from reidreg.data.datasets import ReIDDataset
from reidreg.deploy.feature_file import load_features
from reidreg.evaluation.checkpoint_eval import extract as evaluation_features
from reidreg.extract import extract_images
from reidreg.models.checkpoint import build_model, load_checkpoint
from reidreg.train import train
from tests.conftest import CONF_DIR, compose_config

REPO = Path(__file__).resolve().parents[1]


class TrainedRun:
    """A tiny trained checkpoint, its test set and the features evaluation computes for it."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.run_config, weights = load_checkpoint(checkpoint)
        data = {k: v for k, v in self.run_config["data"].items() if k != "_target_"}
        self.datamodule = ReIDDataModule(**{**data, "val_identities": 0, "num_workers": 0})
        self.dataset: ReIDDataset = self.datamodule.load()
        self.model = build_model(self.run_config, weights)
        self._features: dict[bool, dict[str, torch.Tensor]] = {}

    def evaluation_features(self, *, flip: bool) -> dict[str, torch.Tensor]:
        """``reidreg.evaluate``'s features of the test set by image path relative to the dataset folder."""
        if flip not in self._features:
            feats = evaluation_features(
                self.model, self.datamodule.test_dataloader(), torch.device("cpu"), flip=flip
            )["feats"]
            samples = self.dataset.query + self.dataset.gallery
            self._features[flip] = {
                Path(path).relative_to(self.dataset.root).as_posix(): row
                for (path, _, _), row in zip(samples, feats, strict=True)
            }
        return self._features[flip]


def train_tiny_run(folder: Path) -> TrainedRun:
    """One epoch of the tiny synthetic run (tests/conftest.py) in ``folder``, without the final test."""
    cfg = compose_config(folder, "trainer.max_epochs=1", "test=false")
    train(cfg)
    return TrainedRun(Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    return train_tiny_run(tmp_path_factory.mktemp("extract"))


def extract_config(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=["device=cpu", *overrides])


def run_as_typed(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "reidreg.extract", *arguments]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_rows_equal(got, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1e-5, atol=1e-6)


def copy_images(names: list[str], source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / Path(name).name).write_bytes((source / name).read_bytes())


def test_features_of_the_dataset_folder_equal_evaluations(trained, tmp_path):
    """Every test image (query + gallery folders, found recursively) gets evaluation's flipped feature."""
    out = tmp_path / "features.npz"
    results = extract_images(
        extract_config(
            f"ckpt_path={trained.checkpoint}", f"images={trained.dataset.root}", f"out={out}", "num_workers=2"
        )
    )
    saved = load_features(out)
    on_disk = sorted(
        p.relative_to(trained.dataset.root).as_posix() for p in trained.dataset.root.rglob("*.jpg")
    )
    assert saved["paths"] == on_disk  # recursive, sorted, train folder included
    assert results["num_images"] == len(on_disk) and results["skipped"] == []
    assert saved["flip"] is True and saved["features"].dtype.name == "float32"
    rows = dict(zip(saved["paths"], saved["features"], strict=True))
    expected = trained.evaluation_features(flip=True)
    assert len(expected) > 20
    for path, feature in expected.items():
        assert_rows_equal(rows[path], feature)


def test_a_list_file_keeps_its_order_and_names_without_flip(trained, tmp_path):
    """List entries relative to the list file's folder or absolute; safetensors output; ``flip=false``."""
    expected = trained.evaluation_features(flip=False)
    chosen = sorted(expected)[::3][:8][::-1]
    absolute = [trained.dataset.root / name for name in chosen]
    entries = [os.path.relpath(p, tmp_path) if i % 2 else str(p) for i, p in enumerate(absolute)]
    (tmp_path / "images.txt").write_text("# test images\n\n" + "\n".join(entries) + "\n")
    out = tmp_path / "sub" / "features.safetensors"
    extract_images(
        extract_config(
            f"ckpt_path={trained.checkpoint}",
            f"images={tmp_path / 'images.txt'}",
            f"out={out}",
            "flip=false",
            "num_workers=0",
            "batch_size=3",
        )
    )
    saved = load_features(out)
    assert saved["paths"] == entries and saved["flip"] is False
    for name, feature in zip(chosen, saved["features"], strict=True):
        assert_rows_equal(feature, expected[name])


def test_unreadable_images_are_skipped_and_named(trained, tmp_path, capsys):
    expected = trained.evaluation_features(flip=True)
    good = sorted(expected)[:4]
    folder = tmp_path / "images"
    copy_images(good, trained.dataset.root, folder)
    (folder / "not_an_image.jpg").write_text("hello")
    jpeg = (folder / Path(good[0]).name).read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    out = tmp_path / "features.npz"
    results = extract_images(
        extract_config(
            f"ckpt_path={trained.checkpoint}",
            f"images={folder}",
            f"out={out}",
            "on_error=skip",
            "num_workers=2",
            "batch_size=2",
        )
    )
    assert results["skipped"] == ["not_an_image.jpg", "truncated.jpg"]
    assert "skipped 2 of 6 images" in capsys.readouterr().err
    saved = load_features(out)
    assert saved["paths"] == sorted(Path(name).name for name in good)
    for name, feature in zip(sorted(good, key=lambda n: Path(n).name), saved["features"], strict=True):
        assert_rows_equal(feature, expected[name])


def test_an_unreadable_image_stops_the_cli_with_one_line(trained, tmp_path):
    """Default ``on_error=fail``, loader workers: one line naming the file, no traceback, nothing written."""
    folder = tmp_path / "images"
    copy_images(sorted(trained.evaluation_features(flip=True))[:3], trained.dataset.root, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "features.npz"
    result = run_as_typed(
        f"ckpt_path={trained.checkpoint}", f"images={folder}", f"out={out}", "num_workers=2", "batch_size=1"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and "broken.png" in lines[0]
    assert "embedding" not in result.stdout  # no progress bar when stdout is not a terminal
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "option", "message"),
    [
        ("missing checkpoint", "ckpt_path", "does not exist"),
        ("text file as checkpoint", "ckpt_path", "is not a reidreg.train checkpoint"),
        ("empty folder", "images", "no images found"),
        ("missing listed image", "images", "line 2: 'missing.jpg'"),
        ("unsupported out suffix", "out", ".npz or <file>.safetensors"),
        ("unknown on_error", "on_error", "fail, skip"),
    ],
)
def test_bad_input_fails_with_one_line_naming_the_option(trained, tmp_path, case, option, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    image = trained.dataset.root / sorted(trained.evaluation_features(flip=True))[0]
    (tmp_path / "list.txt").write_text(f"{image}\nmissing.jpg\n")
    options = {
        "ckpt_path": trained.checkpoint,
        "images": trained.dataset.root / "query",
        "out": tmp_path / "features.npz",
        "on_error": "fail",
    }
    options.update(
        {
            "missing checkpoint": {"ckpt_path": tmp_path / "nothing.ckpt"},
            "text file as checkpoint": {"ckpt_path": tmp_path / "notes.ckpt"},
            "empty folder": {"images": tmp_path / "empty"},
            "missing listed image": {"images": tmp_path / "list.txt"},
            "unsupported out suffix": {"out": tmp_path / "features.csv"},
            "unknown on_error": {"on_error": "ignore"},
        }[case]
    )
    result = run_as_typed(*(f"{key}={value}" for key, value in options.items()))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}=") and message in lines[0], lines
    assert not (tmp_path / "features.npz").exists()


def test_the_entry_module_does_not_import_torch():
    """A typo or ``--help`` is answered without loading torch (see reidreg/extract.py)."""
    heavy = "{'torch', 'timm', 'pytorch_lightning'}"
    code = f"import sys, reidreg.extract; print(sorted({heavy} & sys.modules.keys()))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
