"""Per-step cost of each regularizer on the CPU: aten operators (the GPU proxy) and CPU time.

On a GPU, a training step of this project is launch-bound: its time follows the number of operators more
than their sizes. This script counts the aten operators of one real training step of the AdaptiveReID
ResNet-50 (``reidreg.training.step.TrainingStep``, the step ``ReIDModule`` runs: forward, task loss, loss
terms, backward, gradient transforms, Adam(foreach) step; ``reidreg.utils.op_count``), for ``none`` and for
each regularizer, and prints the extra operators of each (those of the optimizer step in their own column:
adaptive L2's θ are more parameters for Adam), the extra host reads (a device sync on a GPU), and the
process CPU time per step of each, measured interleaved with ``none`` (median over ``--steps``, ratio of
medians). The module is built from the composed config, as ``python -m reidreg.train`` builds it, and its
step is run without a Trainer. With ``--device cuda`` the same runs on a GPU (wall time after synchronising
instead of CPU time; ``--bf16`` for bf16 autocast): the operator counts are those of the CPU run, the times
are real.

    python benchmarks/regularizer_ops.py                      # ResNet-50, 256×128, batch 16, 1 thread
    python benchmarks/regularizer_ops.py --batch-size 64 --steps 9 --threads 2
    python benchmarks/regularizer_ops.py --device cuda --bf16 --batch-size 64 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from reidreg.regularizers import StepContext
from reidreg.training.module import ReIDModule
from reidreg.training.run import build_module
from reidreg.utils.config import register_resolvers
from reidreg.utils.op_count import OpCounter, count_step

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# name → overrides of the composed `train` config
VARIANTS = {
    "none": ["regularizer=none"],
    "constant_l2": ["regularizer=constant_l2"],
    "constant_l2 decoupled": ["regularizer=constant_l2", "regularizer.constant_l2.mode=decoupled"],
    "adaptive_l2": ["regularizer=adaptive_l2"],
    "sgsl": ["regularizer=sgsl", "regularizer.sgsl.ce_gate=null"],  # SGSL in every step
    "sgp sites [block4]": ["regularizer=sgp"],
    "sgp param_grads": ["regularizer=sgp", "regularizer.sgp.sites=[]", "regularizer.sgp.param_grads=true"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of forward, losses and terms")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16, help="P×K with K = 4")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=751)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (and as many of none)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on a busy host)"
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS)[1:], choices=list(VARIANTS)[1:])
    return parser.parse_args()


def build(variant: str, args: argparse.Namespace, run_dir: Path) -> tuple[ReIDModule, torch.optim.Optimizer]:
    register_resolvers()
    overrides = [
        f"backbone={args.backbone}",
        "backbone.pretrained=false",
        f"data.height={args.height}",
        f"data.width={args.width}",
        f"paths.output_dir={run_dir}",
        *VARIANTS[variant],
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    module = build_module(cfg, args.num_classes, run_dir).to(args.device)
    optimizer = module.optimizer_factory(params=list(module.parameters()), foreach=True)
    return module.train(), optimizer


class Step:
    """ReIDModule's training step (its ``TrainingStep``), run without a Trainer."""

    def __init__(
        self, module: ReIDModule, optimizer: torch.optim.Optimizer, args: argparse.Namespace
    ) -> None:
        self.module, self.optimizer = module, optimizer
        self.device = torch.device(args.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.bf16)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch_size, 3, args.height, args.width, generator=generator)
        self.images = images.to(self.device)
        self.labels = torch.arange(args.batch_size // 4).repeat_interleave(4).to(self.device)
        self.counts: tuple[OpCounter, OpCounter] | None = None

    def clock(self) -> float:
        """Seconds: process CPU time on the CPU, wall time after synchronising on a GPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    def __call__(self, *, count: bool = False) -> float:
        """Runs the step; returns its time in ms (when counting: with the counters' overhead)."""
        module = self.module
        context = StepContext(module.model, module.loss)

        def step() -> None:
            with self.autocast:
                module.step(context, self.images, self.labels, self.optimizer)

        start = self.clock()
        if count:
            self.counts = count_step(step, self.optimizer)
        else:
            step()
        return (self.clock() - start) * 1e3


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="regularizer_ops_"))
    base = Step(*build("none", args, run_dir), args)
    base()  # Adam's state is made in the first step
    base(count=True)
    base_outside, base_optimizer = base.counts
    clock = "wall time (synchronised)" if base.device.type == "cuda" else "process CPU time"
    print(
        f"{args.backbone} {args.height}×{args.width}, batch {args.batch_size}, {args.device}"
        f"{' bf16 autocast' if args.bf16 else ''}, {args.threads} thread(s), "
        f"{len(list(base.module.model.parameters()))} tensors; Adam(foreach=True); ms = {clock} per step, "
        f"median of {args.steps}"
    )
    base_ops, base_reads = (
        base_outside.total + base_optimizer.total,
        base_outside.host_reads + base_optimizer.host_reads,
    )
    print(
        f"none: {base_ops} aten operators per step ({base_optimizer.total} in Adam), {base_reads} host reads"
    )
    header = (
        f"{'regularizer':<24}{'+ops':>7}{'+ops optim':>12}{'+host reads':>13}"
        f"{'ms none':>10}{'ms reg':>10}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for variant in args.variants:
        step = Step(*build(variant, args, run_dir), args)
        step()
        step(count=True)
        outside, optimizer = step.counts
        times_base, times_variant = [], []
        for _ in range(args.steps):  # interleaved, so that drifting load hits both alike
            times_base.append(base())
            times_variant.append(step())
        median_base, median_variant = statistics.median(times_base), statistics.median(times_variant)
        extra_ops = outside.total - base_outside.total
        extra_optimizer_ops = optimizer.total - base_optimizer.total
        extra_reads = outside.host_reads + optimizer.host_reads - base_reads
        ratio = median_variant / median_base
        print(
            f"{variant:<24}{extra_ops:>7}{extra_optimizer_ops:>12}{extra_reads:>13}"
            f"{median_base:>10.0f}{median_variant:>10.0f}{ratio:>8.3f}",
            flush=True,
        )
        del step


if __name__ == "__main__":
    main()
