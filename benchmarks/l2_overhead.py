"""Cost of the adaptive L2 penalty (paper 000 eq. 8) in one training step of the AdaptiveReID network.

Times forward + task loss + backward + Adam step of a randomly initialised ``ReIDModel`` with and without
``AdaptiveL2`` (steps interleaved, so that drifting machine load hits both alike; median over ``--steps``
after ``--warmup``; wall clock on a GPU, process CPU time on a CPU), and the penalty's own forward +
backward. Defaults: ResNet50, batch 64 at 384×128 on a GPU; batch 8 at 128×64 on a CPU. The penalty's
cost does not depend on the batch or image size, so its share on the small CPU setting overstates the
share at the GPU setting.

    python benchmarks/l2_overhead.py                      # GPU if available
    python benchmarks/l2_overhead.py --device cpu --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from reidreg.losses import ReIDLoss
from reidreg.models import ReIDModel, ResNetBackbone
from reidreg.regularizers import TrainStep
from reidreg.regularizers.adaptive_l2 import AdaptiveL2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, help="default: 64 on GPU, 8 on CPU (a multiple of 4)")
    parser.add_argument("--height", type=int, help="default: 384 on GPU, 128 on CPU")
    parser.add_argument("--width", type=int, help="default: 128 on GPU, 64 on CPU")
    parser.add_argument("--num-classes", type=int, default=751)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if on_gpu else 8)
    args.height = args.height or (384 if on_gpu else 128)
    args.width = args.width or (128 if on_gpu else 64)
    return args


def timed(function: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one call: wall clock on a GPU (after synchronising), CPU time of this process on a
    CPU, which a busy shared machine inflates far less than the wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3
    start = time.process_time()
    function()
    return (time.process_time() - start) * 1e3


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = ReIDModel(ResNetBackbone(args.backbone), num_classes=args.num_classes).to(device).train()
    regularizer = AdaptiveL2()
    regularizer.attach(SimpleNamespace(model=model))
    regularizer.to(device)
    loss_fn = ReIDLoss()
    images = torch.randn(args.batch_size, 3, args.height, args.width, device=device)
    labels = torch.arange(args.batch_size // 4, device=device).repeat_interleave(4)  # P × K, K = 4
    # Separate optimizers so that the baseline step does not even iterate over θ.
    plain_adam = torch.optim.Adam(model.parameters(), lr=2e-4)
    regularized_adam = torch.optim.Adam([*model.parameters(), *regularizer.parameters()], lr=2e-4)

    def train_step(with_penalty: bool) -> None:
        optimizer = regularized_adam if with_penalty else plain_adam
        optimizer.zero_grad(set_to_none=True)
        outputs = model(images)
        task_losses = loss_fn(outputs, labels)
        loss = task_losses["total"]
        if with_penalty:
            step = TrainStep(model, images, labels, outputs, task_losses, global_step=0, epoch=0)
            loss = loss + regularizer.loss_terms(step)["penalty"]
        loss.backward()
        optimizer.step()

    def penalty_only() -> None:
        regularizer.penalty(model).backward()

    times: dict[str, list[float]] = {"without": [], "with": [], "penalty": []}
    for index in range(args.warmup + args.steps):
        samples = {
            "without": timed(lambda: train_step(False), device),
            "with": timed(lambda: train_step(True), device),
            "penalty": timed(penalty_only, device),
        }
        if index >= args.warmup:
            for key, value in samples.items():
                times[key].append(value)

    median = {key: statistics.median(values) for key, values in times.items()}
    clock = "wall clock" if device.type == "cuda" else f"CPU time, {torch.get_num_threads()} threads"
    print(
        f"device={device} backbone={args.backbone} batch={args.batch_size} size={args.height}x{args.width} "
        f"regularised tensors={len(regularizer.target_names)} steps={args.steps} (median ms, {clock})"
    )
    print(f"  step without adaptive L2 : {median['without']:9.2f}")
    print(f"  step with adaptive L2    : {median['with']:9.2f}")
    overhead = median["with"] - median["without"]
    share = 100 * overhead / median["without"]
    print(f"  difference               : {overhead:9.2f}  ({share:+.2f} % of a step)")
    print(
        f"  penalty fwd+bwd alone    : {median['penalty']:9.2f}  "
        f"({100 * median['penalty'] / median['without']:.2f} % of a step)"
    )


if __name__ == "__main__":
    main()
