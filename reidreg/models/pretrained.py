"""ImageNet weights of a backbone: read from a local file, or downloaded once into that file when asked.

Nothing is downloaded unless ``allow_download`` is true. Then timm fetches the weights from the Hugging
Face Hub (its cache and ``HF_*`` settings apply) and they are written, atomically, to ``weights_file`` —
the same state dict the README's "save it yourself" recipe writes — so the next run reads the file and
needs no network. Every failure is one line naming the option, the file and what to do; an offline machine
is told so at once (one request to the Hub), not after huggingface_hub's minute of retries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from torch import nn

from reidreg.errors import ReIDRegError, one_line
from reidreg.run_dir import atomic_write

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


class BackboneError(ReIDRegError):
    """A backbone option is invalid (unknown name, missing weights file, failed download, ...)."""


def weights_source(name: str) -> str:
    """Where timm downloads the weights of ``name`` from (a Hugging Face Hub page, or a URL)."""
    from huggingface_hub import constants

    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.hf_hub_id:
        return f"{constants.ENDPOINT}/{pretrained_cfg.hf_hub_id}"
    if pretrained_cfg is not None and pretrained_cfg.url:
        return pretrained_cfg.url
    return f"timm's pretrained source of {name}"


def _check_hub_reachable() -> None:
    """One request to the Hub, without retries: raises at once on a machine without network access.

    In huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``) nothing is probed: timm then reads its cache.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if not constants.is_offline_mode():
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)


def download_network(name: str, weights_file: Path | None) -> nn.Module:
    """timm's ``name`` with its pretrained weights from the Hub; saved to ``weights_file`` when given."""
    source = weights_source(name)
    try:
        _check_hub_reachable()
        network = timm.create_model(name, pretrained=True)
    except Exception as error:  # no network, offline mode, proxy, HTTP or cache errors: all end here
        where = (
            f"put the file at {weights_file} (README, 'Pretrained weights')"
            if weights_file
            else "set backbone.weights_file to a local state dict"
        )
        raise BackboneError(
            f"backbone.allow_download=true: downloading the {name} weights from {source} failed "
            f"({type(error).__name__}: {one_line(error)}); {where}, or use backbone.pretrained=false"
        ) from None
    if weights_file is None:
        log.info("backbone.allow_download=true: %s weights from %s (timm's cache)", name, source)
        return network
    import safetensors.torch

    atomic_write(weights_file, safetensors.torch.save(network.state_dict()))  # creates the parent folder
    size = f"{weights_file.stat().st_size / 1e6:.1f} MB"
    log.info(
        "backbone.allow_download=true: downloaded %s from %s to %s (%s)", name, source, weights_file, size
    )
    return network


def pretrained_network(name: str, *, weights_file: str | None, allow_download: bool) -> nn.Module:
    """timm's ``name`` with ImageNet weights: from ``weights_file``, downloaded there, or (no file) from
    timm's cache; a ``BackboneError`` says what to do when none of these is possible."""
    path = Path(weights_file).expanduser().absolute() if weights_file else None
    if path is not None and path.is_file():
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    if allow_download:
        return download_network(name, path)
    if path is not None:
        raise BackboneError(
            f"backbone.weights_file={str(path)!r} does not exist: add backbone.allow_download=true to "
            f"download the {name} weights there once from {weights_source(name)}, or save a state dict of "
            f"timm's {name} there yourself (README, 'Pretrained weights'), or use backbone.pretrained=false"
        )
    raise BackboneError(
        f"backbone.pretrained=true but no backbone.weights_file is set for {name!r}, and downloads are off: "
        "set backbone.weights_file=/path/to/weights (.pth/.bin/.safetensors state dict), or add "
        "backbone.allow_download=true, or use backbone.pretrained=false"
    )
