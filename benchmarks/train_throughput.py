"""Training throughput: the network alone, the training DataLoader alone, and full reidreg steps.

    python benchmarks/train_throughput.py                 # full size on a GPU (ResNet-50, 256×128 / 384×128)
    python benchmarks/train_throughput.py --small         # CPU-sized: test_resnet, small images
    python benchmarks/train_throughput.py --sections loader --workers 12,16 --out table.md

Three sections, each printed as a table (img/s, ms/step, peak GPU memory, ratio to the section's first row):

(a) ``network``: ``ReIDModel`` + ``ReIDLoss`` + backward + Adam step on a batch already on the device,
    without loader or Lightning: the limit a training step can reach. Variants (``--variants``): precision
    (fp32, bf16, fp16 with a GradScaler) × channels-last (``+cl``) × fused Adam (``+fused``) ×
    ``torch.compile`` of the whole forward (``+compile``, ``training.device_settings.compile_network``).
(b) ``loader``: the training DataLoader alone, on the default synthetic set (3,350 images, 128×64 on
    disk) at the preset's training size: the per-image CPU path (``ReIDDataModule.train_dataloader``:
    decode + resize + augment per image in N workers) against the cached path (``ImageCache`` +
    ``CachedTrainImages`` in N workers + ``BatchAugment`` on the device), both including the copy to the
    device. The cache's build time is printed too.
(b2) ``augment``: the same two paths in this one process, without workers (per-image work vs batch work).
(c) ``module``: full reidreg training steps — ``ReIDModule`` from ``reidreg.training.run.build_module`` on
    the composed config of ``experiment=<preset>``, driven by a ``pl.Trainer`` (``max_steps``) on
    in-memory uint8 batches augmented on the device as the GPU pipeline does — for presets × precisions
    × regularizers, with each regularizer's overhead against ``none``. The device settings of
    ``reidreg.training.device_settings`` (channels-last, fused Adam, cudnn.benchmark) are applied as the
    trainer will apply them. Step time = ``on_train_batch_start`` → ``on_train_batch_end`` (synchronised).
    Final reports (``on_train_end``: adaptive L2's plots) are skipped: they are not part of a step.

Variants of a section are interleaved round by round in one process (machine load drifts alike over all);
each figure is the median over rounds. Wall clock, synchronised on a GPU.

This merges the former ``benchmarks/l2_overhead.py``: the adaptive-L2 overhead is the ``adaptive_l2`` row of
(c). Operation counts of the regularizers are in ``benchmarks/regularizer_ops.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
RUN_DIR = Path(tempfile.mkdtemp(prefix="train_throughput_"))  # build_module's run_dir; nothing is kept

# Presets and their sizes: (experiment, full-size H×W, --small H×W).
PRESETS = {
    "bot_r50": ("bot_r50", (256, 128), (128, 64)),
    "adaptivereid": ("adaptivereid_market1501", (384, 128), (192, 64)),
}


# ------------------------------------------------------------------------------------------ helpers
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU sizes: test_resnet, small images, batch 16")
    parser.add_argument("--sections", default="network,loader,augment,module")
    parser.add_argument("--presets", default="bot_r50,adaptivereid")
    parser.add_argument(
        "--variants",
        help="network variants, comma-separated (default: GPU fp32,bf16,bf16+cl,bf16+cl+fused,"
        "bf16+cl+fused+compile,fp16+cl; CPU fp32,fp32+cl,bf16)",
    )
    parser.add_argument("--precisions", help="module precisions (default: GPU 32,bf16-mixed; CPU 32)")
    parser.add_argument(
        "--regularizers", default="none,constant_l2,adaptive_l2,sgp,sgsl,adversarial", help="module section"
    )
    parser.add_argument("--workers", help="loader workers, comma-separated (default: GPU 12,16; CPU 2)")
    parser.add_argument("--rounds", type=int, help="timed rounds per section (default: GPU 5, CPU 3)")
    parser.add_argument("--steps", type=int, help="steps (or loader batches) per variant and round")
    parser.add_argument("--num-classes", type=int, default=751, help="identities (Market-1501: 751)")
    parser.add_argument("--data-dir", default="data", help="where the synthetic set is (generated if absent)")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (1 on a shared CPU: spinning threads on busy cores)",
    )
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.small = args.small or not gpu
    args.variants = args.variants or (
        "fp32,bf16,bf16+cl,bf16+cl+fused,bf16+cl+fused+compile,fp16+cl" if gpu else "fp32,fp32+cl,bf16"
    )
    args.precisions = args.precisions or ("32,bf16-mixed" if gpu else "32")
    args.workers = args.workers or ("12,16" if gpu else "2")
    args.rounds = args.rounds or (5 if gpu else 3)
    args.steps = args.steps or (10 if gpu else 3)
    return args


def split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def pk_labels(batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(batch_size // 4, device=device).repeat_interleave(4)  # P × K, K = 4


@dataclasses.dataclass
class Row:
    name: str
    batch: int
    ms_per_step: list[float] = dataclasses.field(default_factory=list)
    peak_mib: float | None = None
    note: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms_per_step) if self.ms_per_step else float("nan")

    @property
    def img_per_s(self) -> float:
        return 1e3 * self.batch / self.median_ms


def render(title: str, rows: list[Row]) -> str:
    base = rows[0].median_ms if rows else float("nan")
    lines = [
        f"### {title}",
        "",
        "| variant | img/s | ms/step | vs first row | peak GPU MiB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        peak = f"{row.peak_mib:,.0f}" if row.peak_mib is not None else "–"
        speed = f"{row.img_per_s:,.0f} | {row.median_ms:.2f} | {row.median_ms / base:.2f}×"
        lines.append(f"| {row.name} | {speed} | {peak} | {row.note} |")
    return "\n".join(lines) + "\n"


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from reidreg.utils.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        # paths.output_dir comes from Hydra's run directory, which a composed (not launched) config lacks.
        return hydra_compose("train", overrides=[f"paths.output_dir={RUN_DIR}", *overrides])


def preset_overrides(preset: str, args: argparse.Namespace) -> list[str]:
    experiment, full, small = PRESETS[preset]
    height, width = small if args.small else full
    overrides = [f"experiment={experiment}", f"data.height={height}", f"data.width={width}"]
    if args.small:
        overrides += ["backbone=test_resnet", "model.stripe_channels=64", "data.num_identities=4"]
    else:
        overrides += ["backbone.pretrained=false"]  # no download on the device machine; speed is the same
    return overrides


# ------------------------------------------------------------------------------- (a) the network alone
def network_section(args: argparse.Namespace, device: torch.device) -> str:
    from reidreg.losses import ReIDLoss
    from reidreg.models import ReIDModel, ResNetBackbone
    from reidreg.training.device_settings import compile_network

    output = ""
    for preset in split(args.presets):
        cfg = compose(*preset_overrides(preset, args))
        batch = cfg.data.num_identities * cfg.data.num_instances
        torch.manual_seed(0)
        backbone = ResNetBackbone(cfg.backbone.name.split(".")[0], last_stride_one=True)
        base_model = ReIDModel(
            backbone,
            args.num_classes,
            regional_branches=cfg.model.regional_branches,
            num_stripes=cfg.model.num_stripes,
            stripe_channels=cfg.model.stripe_channels,
            clip=cfg.model.clip,
        )
        loss_fn = ReIDLoss(triplet_margin=cfg.loss.triplet_margin)
        images = torch.randn(batch, 3, cfg.data.height, cfg.data.width, device=device)
        labels = pk_labels(batch, device)
        steps: dict[str, Callable[[], None]] = {}
        rows: dict[str, Row] = {}
        for variant in split(args.variants):
            parts = variant.split("+")
            precision, flags = parts[0], set(parts[1:])
            model = copy.deepcopy(base_model).to(device).train()
            inputs = images
            if "cl" in flags:
                model.to(memory_format=torch.channels_last)
                inputs = images.contiguous(memory_format=torch.channels_last)
            if "compile" in flags:
                compile_network(model)
            optimizer = torch.optim.Adam(
                model.parameters(), lr=3.5e-4, fused=True if "fused" in flags else None
            )
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
            steps[variant] = network_step(model, loss_fn, optimizer, inputs, labels, dtype, scaler, device)
            rows[variant] = Row(variant, batch)
            # Warm-up alone (compilation, cuDNN's algorithm search), with this variant's peak memory.
            reset_peak_memory(device)
            for _ in range(3):
                steps[variant]()
            synchronize(device)
            rows[variant].peak_mib = peak_memory_mib(device)
        for _ in range(args.rounds):
            for variant, step in steps.items():
                rows[variant].ms_per_step.append(timed(step, args.steps, device))
        title = f"(a) network alone — {preset}, batch {batch}, {cfg.data.height}×{cfg.data.width}, {device}"
        output += render(title, list(rows.values())) + "\n"
        del steps, rows
    return output


def network_step(model, loss_fn, optimizer, images, labels, dtype, scaler, device) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(images), labels)["total"]
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def timed(step: Callable[[], None], count: int, device: torch.device) -> float:
    """Milliseconds per call of ``step``, over ``count`` calls between two synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / count


# ------------------------------------------------------------------------------ (b) the loader alone
def loader_section(args: argparse.Namespace, device: torch.device) -> str:
    from torch.utils.data import DataLoader

    from reidreg.data.batch_augment import AugmentSpec, BatchAugment
    from reidreg.data.datamodule import SeededBatches, read_image
    from reidreg.data.image_cache import CachedTrainImages, ImageCache
    from reidreg.data.sampler import PKBatchSampler
    from reidreg.utils.config import instantiate

    output = ""
    for preset in split(args.presets):
        experiment, (height, width), _ = PRESETS[preset]
        for workers in (int(w) for w in split(args.workers)):
            cfg = compose(
                f"experiment={experiment}",
                "dataset=synthetic",
                f"paths.data_dir={args.data_dir}",
                f"data.num_workers={workers}",
                "data.steps_per_epoch=2000",  # one epoch outlasts the measurement
            )
            datamodule = instantiate(cfg.data)
            datamodule.prepare_data()
            datamodule.setup("fit")
            samples = datamodule.train_samples
            batch = cfg.data.num_identities * cfg.data.num_instances
            start = time.perf_counter()
            cache = ImageCache.build(
                [path for path, _, _ in samples], height=height, width=width, read=read_image
            )
            build_s = time.perf_counter() - start
            spec = AugmentSpec(
                height=height,
                width=width,
                hflip=cfg.data.hflip,
                pad_crop=cfg.data.pad_crop,
                padding=cfg.data.padding,
                random_erasing=cfg.data.random_erasing,
                random_erasing_prob=cfg.data.random_erasing_prob,
            )
            labels = [pid for _, pid, _ in samples]
            batches = SeededBatches(
                PKBatchSampler(
                    labels,
                    num_identities=cfg.data.num_identities,
                    num_instances=cfg.data.num_instances,
                    num_batches=2000,
                    seed=cfg.seed,
                ),
                cfg.seed,
            )
            cached_loader = DataLoader(
                CachedTrainImages(cache, labels, spec),
                batch_sampler=batches,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=device.type == "cuda",
            )
            cpu_path = Row("per-image CPU path (decode + resize + augment in workers)", batch)
            cached_path = Row("cached + batch augment on the device", batch)
            cached_path.note = (
                f"cache: {len(cache)} images, {cache.nbytes / 2**20:.0f} MiB, built in {build_s:.1f} s"
            )
            fetchers = {
                cpu_path.name: (cpu_path, fetcher(iter(datamodule.train_dataloader()), None, device)),
                cached_path.name: (cached_path, fetcher(iter(cached_loader), BatchAugment(spec), device)),
            }
            for _, fetch in fetchers.values():
                for _ in range(3):
                    fetch()  # workers started, queues filled
            for _ in range(args.rounds):
                for row, fetch in fetchers.values():
                    row.ms_per_step.append(timed(fetch, args.steps * 2, device))
            title = f"(b) training DataLoader alone — {height}×{width}, batch {batch}, {workers} workers"
            output += render(f"{title}, {device}", [cpu_path, cached_path]) + "\n"
            del fetchers
    return output


def fetcher(batches: Iterator, augment: Callable | None, device: torch.device) -> Callable[[], None]:
    """Next batch → on the device (→ batch augmentation, for the cached path's (uint8, labels, params))."""

    def fetch() -> None:
        batch = next(batches)
        images = batch[0].to(device, non_blocking=True)
        if augment is not None:
            augment(images, batch[2].to(device, non_blocking=True))

    return fetch


def augment_section(args: argparse.Namespace, device: torch.device) -> str:
    """Both paths in this process, on this device (a CPU: one core's work per image with ``--threads 1``):
    the per-image path (``read_image`` + ``TrainTransform(image, seed)``) against the cached path (index
    the cache + draw the parameters + ``augment_batch`` on the whole batch)."""
    from reidreg.data.datamodule import read_image
    from reidreg.data.image_cache import ImageCache
    from reidreg.utils.config import instantiate

    output = ""
    for preset in split(args.presets):
        experiment, (height, width), _ = PRESETS[preset]
        cfg = compose(f"experiment={experiment}", "dataset=synthetic", f"paths.data_dir={args.data_dir}")
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        paths = [path for path, _, _ in datamodule.train_samples]
        batch = cfg.data.num_identities * cfg.data.num_instances
        cache = ImageCache.build(paths, height=height, width=width, read=read_image)
        rows = augment_rows(paths, cache, batch, args, device)
        threads = torch.get_num_threads()
        title = f"(b2) augmentation in one process — {height}×{width}, batch {batch}, {threads} thread(s)"
        output += render(f"{title}, {device}", rows) + "\n"
    return output


def augment_rows(
    paths: list[str], cache, batch: int, args: argparse.Namespace, device: torch.device
) -> list[Row]:
    from reidreg.data.batch_augment import AugmentSpec, BatchAugment, draw_batch_params
    from reidreg.data.datamodule import read_image
    from reidreg.data.transforms import TrainTransform

    _, height, width = cache.images.shape[1:]
    spec = AugmentSpec(height=height, width=width)
    transform, augment = TrainTransform(spec), BatchAugment(spec)
    cursor = iter(range(10**9))

    def per_image() -> None:
        first = next(cursor) * batch
        for position in range(first, first + batch):
            transform(read_image(paths[position % len(paths)]), position)

    def cached() -> None:
        first = next(cursor) * batch
        images = cache.images[torch.arange(first, first + batch) % len(paths)]
        augment(images.to(device), draw_batch_params(range(first, first + batch), spec))

    rows = [
        Row("per-image path: decode + resize + augment, one image at a time", batch),
        Row(f"cached: index + draw params + batch augment on {device}", batch),
    ]
    for _ in range(args.rounds):
        for row, fetch in zip(rows, (per_image, cached), strict=True):
            row.ms_per_step.append(timed(fetch, args.steps, device))
    return rows


# ----------------------------------------------------------------------------- (c) full module steps
def module_section(args: argparse.Namespace, device: torch.device) -> str:
    import pytorch_lightning as pl

    from reidreg.data.batch_augment import AugmentSpec, BatchAugment, draw_batch_params
    from reidreg.training.device_settings import prepare_network, resolve_device_settings, with_fused_adam
    from reidreg.training.run import build_module

    class InMemoryBatches(pl.LightningDataModule):
        """uint8 images + augmentation params in host memory, augmented on the device after the transfer
        (what the GPU pipeline does, without reading files)."""

        def __init__(self, spec: AugmentSpec, batch: int, count: int) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.images = torch.randint(
                0, 256, (count * batch, 3, spec.height, spec.width), generator=generator
            )
            self.images = self.images.to(torch.uint8)
            self.params = draw_batch_params(range(count * batch), spec)
            self.labels = pk_labels(batch).repeat(count)
            self.batch, self.augment = batch, BatchAugment(spec)

        def train_dataloader(self):
            from torch.utils.data import DataLoader, TensorDataset

            data = TensorDataset(self.images, self.labels, self.params)
            return DataLoader(data, batch_size=self.batch, pin_memory=device.type == "cuda")

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            images, labels, params = batch
            return self.augment(images, params), labels

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.ms: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            synchronize(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize(device)
            self.ms.append((time.perf_counter() - self.start) * 1e3)

    output = ""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    for preset in split(args.presets):
        for precision in split(args.precisions):
            settings = resolve_device_settings(accelerator=accelerator, precision=precision)
            modules, rows, data = {}, {}, None
            for regularizer in split(args.regularizers):
                cfg = compose(*preset_overrides(preset, args), f"regularizer={regularizer}")
                if regularizer in ("constant_l2", "adaptive_l2"):  # explicit L2 replaces the optimizer's
                    cfg.optim.optimizer.weight_decay = 0.0
                batch = cfg.data.num_identities * cfg.data.num_instances
                if data is None:
                    spec = AugmentSpec(height=cfg.data.height, width=cfg.data.width)
                    data = InMemoryBatches(spec, batch, count=args.steps + 1)  # one epoch per fit
                torch.manual_seed(0)
                module = build_module(cfg, args.num_classes, RUN_DIR)
                prepare_network(module.model, settings)
                module.optimizer_factory = with_fused_adam(module.optimizer_factory, settings)
                module.on_train_end = lambda: None  # final reports are not part of a step
                modules[regularizer] = module
                rows[regularizer] = Row(regularizer, batch)
            for round_index in range(args.rounds + 1):  # round 0 warms up (compile, cuDNN search)
                for regularizer, module in modules.items():
                    timer = StepTimer()
                    trainer = pl.Trainer(
                        accelerator=accelerator,
                        devices=1,
                        max_steps=args.steps + 1,
                        callbacks=[timer],
                        logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False,
                        enable_model_summary=False,
                        limit_val_batches=0,
                        num_sanity_val_steps=0,
                        log_every_n_steps=50,
                        **settings.trainer_kwargs(),
                    )
                    reset_peak_memory(device)
                    trainer.fit(module, datamodule=data)
                    if round_index:
                        rows[regularizer].ms_per_step.extend(timer.ms[1:])  # first step: new optimizer state
                        peak = peak_memory_mib(device)
                        if peak is not None:
                            rows[regularizer].peak_mib = max(rows[regularizer].peak_mib or 0.0, peak)
            base = rows.get("none")
            for row in rows.values():
                if base is not None and row is not base:
                    row.note = f"{row.median_ms - base.median_ms:+.2f} ms vs none"
            title = (
                f"(c) reidreg training steps (Lightning) — {preset}, precision {settings.precision}, "
                f"batch {batch}, {cfg.data.height}×{cfg.data.width}, {device}"
            )
            output += render(title, list(rows.values())) + "\n"
    return output


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    header = (
        f"train_throughput: device={device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"rounds={args.rounds}, steps/round={args.steps}, small={args.small}\n"
    )
    print(header, flush=True)
    sections = {
        "network": network_section,
        "loader": loader_section,
        "augment": augment_section,
        "module": module_section,
    }
    text = header + "\n"
    for name in split(args.sections):
        table = sections[name](args, device)
        print(table, flush=True)
        text += table
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
