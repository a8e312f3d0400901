"""``python -m reidreg.extract ckpt_path=... images=<folder|list file> out=<features.npz|.safetensors>``.

Embeddings of image files with a trained model, as evaluation computes them: the network and the test
transform (size, normalisation) are rebuilt from the config stored in the checkpoint, and every image
goes through ``ReIDModel.extract_features`` (flip-averaged unless ``flip=false``). The features are
written with the images' paths (``reidreg.deploy.feature_file`` describes the fields).

torch is imported only once the options have been checked, so that a typo fails at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from reidreg.deploy.image_list import list_images
from reidreg.options.check import validate_before_work
from reidreg.utils.cli import command, run_cli

SKIPPED_SHOWN = 5  # unreadable files named in the summary of on_error=skip


def extract_images(cfg: DictConfig) -> dict[str, Any]:
    """Embed the images of ``cfg.images`` with ``cfg.ckpt_path``'s network; write ``cfg.out``."""
    validate_before_work(cfg, "extract")  # every option (reidreg/options/tables.py), before torch
    out, checkpoint = Path(cfg.out).expanduser(), Path(cfg.ckpt_path).expanduser()
    images = list_images(cfg.images, option="images")

    from reidreg.deploy.feature_file import save_features
    from reidreg.deploy.image_files import embed_images
    from reidreg.deploy.network import image_transform, preprocessing
    from reidreg.models.checkpoint import build_model, load_checkpoint, resolve_device

    device = resolve_device(cfg.device)
    run_config, weights = load_checkpoint(checkpoint)
    model = build_model(run_config, weights).to(device)
    spec = preprocessing(run_config)
    embeddings = embed_images(
        model,
        images,
        image_transform(run_config),
        height=spec["height"],
        width=spec["width"],
        device=device,
        flip=bool(cfg.flip),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        on_error=cfg.on_error,
    )
    names = [images.names[index] for index in embeddings.kept]
    features = embeddings.features.numpy()
    save_features(out, names, features, checkpoint=str(checkpoint.resolve()), flip=bool(cfg.flip))
    skipped = [images.names[index] for index, _ in embeddings.failed]
    if skipped:
        shown = ", ".join(f"{images.names[i]} ({reason})" for i, reason in embeddings.failed[:SKIPPED_SHOWN])
        more = f", and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        print(
            f"warning: skipped {len(skipped)} of {len(images)} images that could not be read: {shown}{more}",
            file=sys.stderr,
        )
    print(f"  features         {out}  ({len(names)} images x {features.shape[1]}, on {device})")
    return {
        "out": str(out),
        "num_images": len(names),
        "embedding_dim": int(features.shape[1]),
        "skipped": skipped,
    }


@command("extract")
def main(cfg: DictConfig) -> None:
    run_cli(extract_images, cfg)


if __name__ == "__main__":
    main()
