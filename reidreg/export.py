"""``python -m reidreg.export ckpt_path=... format=onnx|torchscript out=... [check_images=<folder>]``.

Writes the embedding network of a trained model (``reidreg.deploy.network.EmbeddingNetwork``: normalised
images (N, 3, H, W) in, the concatenated embedding (N, D) out, dynamic N, flip-averaging baked in unless
``flip=false``) as ONNX or TorchScript, checks that the written file reproduces torch's features
(``reidreg.deploy.exporters``), and writes the preprocessing the input needs to ``<out>.json``.
Export runs on the CPU.

torch and onnx are imported only once the options have been checked, so that a typo fails at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from reidreg.deploy.image_list import list_images
from reidreg.errors import ConfigError
from reidreg.options.check import validate_before_work
from reidreg.run_dir import staged
from reidreg.utils.cli import command, run_cli

CHECK_IMAGES = 16  # real images in the check: the first ones of check_images


def metadata_path(out: Path) -> Path:
    """``model.onnx`` → ``model.onnx.json``: the preprocessing and provenance of an exported file."""
    return out.with_name(out.name + ".json")


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"format=onnx needs the optional 'export' dependencies ({error.name or error} is missing): "
            "pip install -e '.[export]'"
        ) from None


def export_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``'s embedding network to ``cfg.out``; returns what ``<out>.json`` holds."""
    validate_before_work(cfg, "export")  # every option (reidreg/options/tables.py), before torch
    out, checkpoint = Path(cfg.out).expanduser(), Path(cfg.ckpt_path).expanduser()
    check_images = list_images(cfg.check_images, option="check_images") if cfg.check_images else None
    if cfg.format == "onnx":
        require_onnx()

    import torch

    from reidreg.deploy import exporters
    from reidreg.deploy.image_files import read_images
    from reidreg.deploy.network import EmbeddingNetwork, image_transform, preprocessing
    from reidreg.models.checkpoint import build_model, load_checkpoint

    run_config, weights = load_checkpoint(checkpoint)
    network = EmbeddingNetwork(build_model(run_config, weights), flip=bool(cfg.flip)).eval()
    spec = preprocessing(run_config)
    shape = (3, spec["height"], spec["width"])
    generator = torch.Generator().manual_seed(0)
    inputs = {"random": torch.randn(exporters.CHECK_BATCH, *shape, generator=generator)}
    if check_images is not None:
        real = check_images.head(CHECK_IMAGES)
        inputs["real"] = read_images(real, image_transform(run_config), height=shape[1], width=shape[2])

    export, load = exporters.EXPORTERS[cfg.format]
    with staged(out) as partial:
        export(network, partial, torch.randn(exporters.EXAMPLE_BATCH, *shape, generator=generator))
        errors = exporters.check_export(load(partial), network, inputs, format_name=cfg.format)

    embedding_dim = network.model.embedding_dim
    metadata: dict[str, Any] = {
        "format": cfg.format,
        "file": out.name,
        "checkpoint": str(checkpoint.resolve()),
        "input": {"name": exporters.INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": exporters.OUTPUT_NAME, "shape": ["batch", embedding_dim], "dtype": "float32"},
        "flip": bool(cfg.flip),
        "metric": run_config["evaluation"]["metric"],
        "preprocessing": spec,
        "trained": {"backbone": run_config["backbone"]["name"], "dataset": run_config["dataset"]["name"]},
        "check": {
            "tolerance": exporters.TOLERANCE,
            "relative_error": errors,
            "batch_sizes": {what: len(images) for what, images in inputs.items()},
        },
        "torch": torch.__version__,
    }
    if cfg.format == "onnx":
        metadata["opset"] = exporters.onnx_opset(out)
    metadata_path(out).write_text(json.dumps(metadata, indent=2) + "\n")
    checked = ", ".join(f"{what} {error:.1e}" for what, error in errors.items())
    print(f"  {cfg.format:<16} {out}  ((N, {', '.join(map(str, shape))}) -> (N, {embedding_dim}))")
    print(f"  preprocessing    {metadata_path(out)}")
    print(f"  check            relative error vs torch: {checked} (tolerance {exporters.TOLERANCE:.0e})")
    return metadata


@command("export")
def main(cfg: DictConfig) -> None:
    run_cli(export_checkpoint, cfg)


if __name__ == "__main__":
    main()
