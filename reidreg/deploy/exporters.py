"""The embedding network written as ONNX or TorchScript, and the check that the file reproduces torch.

ONNX uses torch's ``torch.export``-based exporter (``dynamo=True``, torch's default since 2.9, which
needs ``onnxscript``). The older TorchScript-based exporter (``dynamo=False``) also works offline and is
faster, but it is deprecated in torch 2.14 and built on ``torch.jit.trace``, itself deprecated; the
``torch.export`` path is the one torch maintains. The batch dimension is exported as dynamic
(``torch.export.Dim``); height and width are fixed at the training size.

TorchScript uses ``torch.jit.trace``: the network has no data-dependent control flow (``flip`` is a
Python constant, stripes are a fixed ``chunk`` along the height), so tracing records all of it and the
traced graph works for any batch size. torch deprecates TorchScript in favour of ``torch.export``; its
FutureWarning is silenced here since the user asked for this format.

Every file is checked after writing (``check_export``): it is loaded again (ONNX Runtime on the CPU, or
``torch.jit.load``), run on a random batch of ``CHECK_BATCH`` images (exported with ``EXAMPLE_BATCH``:
this also checks that the batch size is free) and on real images if given, and must reproduce torch's
features within ``TOLERANCE``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from reidreg.errors import ReIDRegError

TOLERANCE = 1e-4  # max over images of ||exported − torch||₂ / ||torch||₂
EXAMPLE_BATCH = 2  # the batch size the graph is exported with; checks run other sizes
CHECK_BATCH = 3  # random images in the check
INPUT_NAME, OUTPUT_NAME = "images", "features"

Runner = Callable[[torch.Tensor], torch.Tensor]
Exporter = Callable[[torch.nn.Module, Path, torch.Tensor], None]


class ExportCheckError(ReIDRegError):
    """An exported file does not reproduce the torch network's features."""


def export_onnx(network: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """Write ``network`` as one ONNX file (weights inside) with a dynamic batch dimension."""
    # The graph optimiser logs every rewrite at INFO (hundreds of lines); only its warnings are kept.
    optimiser_logs = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [log.level for log in optimiser_logs]
    for log in optimiser_logs:
        log.setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            # Keyed by the name of EmbeddingNetwork.forward's argument.
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )
    finally:
        for log, level in zip(optimiser_logs, levels, strict=True):
            log.setLevel(level)


def onnx_runner(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (features,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(features)

    return run


def onnx_opset(path: Path) -> int:
    """The version of the default ONNX operator set the file uses."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def export_torchscript(network: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """Write ``network`` traced as a TorchScript module (``torch.jit.load`` reads it without reidreg)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(network, example)
        torch.jit.save(traced, str(path))


def torchscript_runner(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        return module(images)

    return run


EXPORTERS: dict[str, tuple[Exporter, Callable[[Path], Runner]]] = {
    "onnx": (export_onnx, onnx_runner),
    "torchscript": (export_torchscript, torchscript_runner),
}


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest per-image relative L2 error ``||candidate − reference||₂ / ||reference||₂``."""
    difference = (candidate.double() - reference.double()).norm(dim=1)
    scale = reference.double().norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((difference / scale).max())


@torch.no_grad()
def check_export(
    run: Runner, network: torch.nn.Module, inputs: dict[str, torch.Tensor], *, format_name: str
) -> dict[str, float]:
    """Relative error of ``run`` against ``network`` on each named input batch; raises above TOLERANCE."""
    errors = {}
    for what, images in inputs.items():
        expected = network(images)
        got = run(images)
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportCheckError(
                f"the {format_name} export gives features of shape {tuple(got.shape)} for {what} input of "
                f"batch size {len(images)}, torch gives {tuple(expected.shape)}."
            )
        errors[what] = relative_error(got, expected)
        if not errors[what] <= TOLERANCE:  # also catches NaN
            raise ExportCheckError(
                f"the {format_name} export does not reproduce torch's features on {what} input (batch "
                f"size {len(images)}): relative error {errors[what]:.2e} > {TOLERANCE:.0e}; nothing written."
            )
    return errors
