"""Feature files of ``reidreg.extract``: ``.npz`` (NumPy) or ``.safetensors``, chosen by the suffix.

Both hold the same fields: ``features`` (N, D) float32, one row per image; ``paths`` (N) the image paths
(relative to the ``images=`` folder, or as written in the list file); ``checkpoint`` the checkpoint used;
``flip`` whether features are averaged with those of the flipped image. In ``.npz`` every field is an
array (``paths`` a unicode array, no pickle needed); in ``.safetensors`` ``features`` is the only tensor
and the others are header metadata (``paths`` as a JSON list, ``flip`` as ``"true"``/``"false"``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reidreg.run_dir import staged

FEATURE_SUFFIXES = (".npz", ".safetensors")


def save_features(
    path: Path, paths: Sequence[str], features: np.ndarray, *, checkpoint: str, flip: bool
) -> None:
    """Write a feature file; it appears complete or not at all (written beside it, then renamed)."""
    if path.suffix not in FEATURE_SUFFIXES:
        raise ValueError(f"feature files end in {' or '.join(FEATURE_SUFFIXES)}, got {path}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    with staged(path) as partial:
        if path.suffix == ".npz":
            with partial.open("wb") as file:
                names = np.array(paths, dtype=str)
                np.savez(file, features=features, paths=names, checkpoint=checkpoint, flip=flip)
        else:
            from safetensors.numpy import save_file

            metadata = {"paths": json.dumps(list(paths)), "checkpoint": checkpoint, "flip": json.dumps(flip)}
            save_file({"features": features}, str(partial), metadata=metadata)


def load_features(path: str | Path) -> dict[str, Any]:
    """``{"features": (N, D) float32 array, "paths": [str], "checkpoint": str, "flip": bool}``."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {
                "features": data["features"],
                "paths": data["paths"].tolist(),
                "checkpoint": str(data["checkpoint"]),
                "flip": bool(data["flip"]),
            }
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as data:
        metadata = data.metadata()
        return {
            "features": data.get_tensor("features"),
            "paths": json.loads(metadata["paths"]),
            "checkpoint": metadata["checkpoint"],
            "flip": json.loads(metadata["flip"]),
        }
