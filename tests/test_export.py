"""``reidreg.export``: ONNX and TorchScript files that reproduce torch's features, and the preprocessing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from reidreg.deploy import exporters
from reidreg.deploy.exporters import ExportCheckError, relative_error
from reidreg.deploy.image_files import read_images
from reidreg.deploy.image_list import list_images
from reidreg.deploy.network import image_transform, preprocessing
from reidreg.export import export_checkpoint
from tests.conftest import CONF_DIR
from tests.test_extract import TrainedRun, train_tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    return train_tiny_run(tmp_path_factory.mktemp("export"))


def export_config(*overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("export", overrides=list(overrides))


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    metadata = export_checkpoint(
        export_config(
            f"ckpt_path={trained.checkpoint}",
            "format=onnx",
            f"out={out}",
            f"check_images={trained.dataset.root / 'query'}",
        )
    )
    return out, metadata


def real_images(trained: TrainedRun, folder: str, count: int) -> torch.Tensor:
    """The first ``count`` images of a dataset folder, transformed as evaluation does."""
    spec = preprocessing(trained.run_config)
    images = list_images(trained.dataset.root / folder, option="images").head(count)
    return read_images(
        images, image_transform(trained.run_config), height=spec["height"], width=spec["width"]
    )


def random_images(trained: TrainedRun, count: int) -> torch.Tensor:
    spec = preprocessing(trained.run_config)
    shape = (count, 3, spec["height"], spec["width"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(count))


def test_onnx_reproduces_torch_with_other_batch_sizes(trained, onnx_export):
    """Exported with batch size 2, run with 1, 5 and 7, on random and on real images."""
    out, _ = onnx_export
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "images" and isinstance(graph_input.shape[0], str)  # a symbolic batch
    inputs = [
        random_images(trained, 1),
        random_images(trained, 5),
        real_images(trained, "bounding_box_test", 7),
    ]
    for images in inputs:
        (got,) = session.run(["features"], {"images": images.numpy()})
        expected = trained.model.extract_features(images, flip=True)
        assert got.shape == (len(images), trained.model.embedding_dim)
        assert relative_error(torch.from_numpy(got), expected) <= 1e-4


def test_the_json_preprocessing_lets_a_deployment_reproduce_evaluation(trained, onnx_export):
    """PIL + NumPy preprocessing written from the JSON alone, ONNX Runtime: evaluation's features."""
    out, metadata = onnx_export
    saved = json.loads(out.with_name("model.onnx.json").read_text())
    assert saved == metadata
    spec = saved["preprocessing"]
    assert (spec["channel_order"], spec["layout"], spec["interpolation"]) == ("RGB", "NCHW", "bilinear")
    assert spec["value_range"] == [0.0, 1.0] and spec["antialias"] is True
    assert saved["input"]["shape"] == ["batch", 3, spec["height"], spec["width"]]
    assert saved["output"]["shape"] == ["batch", trained.model.embedding_dim]
    assert saved["flip"] is True and saved["format"] == "onnx" and isinstance(saved["opset"], int)
    assert saved["check"]["batch_sizes"] == {"random": 3, "real": 16}
    assert max(saved["check"]["relative_error"].values()) <= saved["check"]["tolerance"] == 1e-4

    expected = trained.evaluation_features(flip=True)
    names = sorted(expected)[-6:]
    mean, std = np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32)
    batch = []
    for name in names:
        with Image.open(trained.dataset.root / name) as image:
            resized = image.convert("RGB").resize((spec["width"], spec["height"]), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, np.float32) / 255.0
        batch.append(((pixels - mean) / std).transpose(2, 0, 1))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["features"], {"images": np.stack(batch)})
    assert relative_error(torch.from_numpy(got), torch.stack([expected[n] for n in names])) <= 1e-4


def test_torchscript_round_trip_without_flip(trained, tmp_path):
    out = tmp_path / "model.pt"
    metadata = export_checkpoint(
        export_config(f"ckpt_path={trained.checkpoint}", "format=torchscript", f"out={out}", "flip=false")
    )
    assert metadata["flip"] is False and metadata["check"]["batch_sizes"] == {"random": 3}
    assert json.loads((tmp_path / "model.pt.json").read_text()) == metadata
    module = torch.jit.load(str(out))
    for images in (random_images(trained, 1), real_images(trained, "query", 4)):
        with torch.no_grad():
            got = module(images)
        torch.testing.assert_close(
            got, trained.model.extract_features(images, flip=False), rtol=1e-5, atol=1e-6
        )


def test_an_export_that_does_not_reproduce_torch_is_refused(trained, tmp_path, monkeypatch):
    """A runtime that drifts by 1e-3 (relative) fails the check: a clear error and no file left behind."""
    export, load = exporters.EXPORTERS["torchscript"]

    def drifting(path: Path) -> exporters.Runner:
        run = load(path)
        return lambda images: run(images) * (1 + 1e-3)

    monkeypatch.setitem(exporters.EXPORTERS, "torchscript", (export, drifting))
    with pytest.raises(
        ExportCheckError, match=r"on random input \(batch size 3\): relative error 1\.00e-03 > 1e-04"
    ):
        export_checkpoint(
            export_config(
                f"ckpt_path={trained.checkpoint}", "format=torchscript", f"out={tmp_path / 'model.pt'}"
            )
        )
    assert list(tmp_path.iterdir()) == []


def _shadow_onnxruntime(folder: Path) -> dict[str, str]:
    """An environment in which ``import onnxruntime`` fails as if the package were not installed."""
    package = folder / "shadow" / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    return {**os.environ, "PYTHONPATH": str(folder / "shadow")}


@pytest.mark.parametrize(
    ("case", "option", "message"),
    [
        ("unknown format", "format", "onnx, torchscript"),
        ("out suffix of another format", "out", "<file>.onnx"),
        ("missing checkpoint", "ckpt_path", "does not exist"),
        ("torch file that is not a reidreg checkpoint", "ckpt_path", "no stored run config"),
        ("empty check_images folder", "check_images", "no images found"),
        ("onnx extra not installed", "format", "pip install -e '.[export]'"),
    ],
)
def test_bad_input_fails_with_one_line_naming_the_option(trained, tmp_path, case, option, message):
    (tmp_path / "empty").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    options = {"ckpt_path": trained.checkpoint, "format": "onnx", "out": tmp_path / "model.onnx"}
    options.update(
        {
            "unknown format": {"format": "tflite"},
            "out suffix of another format": {"out": tmp_path / "model.pt"},
            "missing checkpoint": {"ckpt_path": tmp_path / "nothing.ckpt"},
            "torch file that is not a reidreg checkpoint": {"ckpt_path": tmp_path / "other.ckpt"},
            "empty check_images folder": {"check_images": tmp_path / "empty"},
            "onnx extra not installed": {},
        }[case]
    )
    env = _shadow_onnxruntime(tmp_path) if case == "onnx extra not installed" else None
    command = [sys.executable, "-m", "reidreg.export", *(f"{key}={value}" for key, value in options.items())]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}=") and message in lines[0], lines
    assert not list(tmp_path.glob("model*"))


def test_the_entry_module_does_not_import_torch_or_onnx():
    """A typo or ``--help`` is answered without loading torch or onnx (see reidreg/export.py)."""
    code = (
        "import sys, reidreg.export; "
        "print(sorted({'torch', 'timm', 'pytorch_lightning', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
