"""The rule of every option of each command: ``"dotted.key": rule``, one line per option.

A composed config holds only keys of its table (anything else is an unknown option, refused with "did you
mean ..."), except below ``OPEN_NODES`` (checked by their own code) and the selected regularizers (each
declares ``OPTION_RULES``). A node whose ``_target_`` lies outside reidreg (Lightning's Trainer, a torch
optimizer, a Lightning logger) also accepts any other keyword of that class's constructor.
"""

from __future__ import annotations

from reidreg.deploy.feature_file import FEATURE_SUFFIXES
from reidreg.options.rules import (
    Rule,
    any_of,
    boolean,
    choice,
    file_name,
    integer,
    list_of,
    mapping,
    number,
    optional,
    string,
)

# What Lightning 2.6's Trainer accepts (tests/test_options.py compares with Lightning's own lists),
# plus ``auto`` (bf16-mixed on GPUs that support it, 32 elsewhere).
PRECISIONS = (
    "auto", 32, "32", "32-true", 16, "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
    64, "64", "64-true", "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = (
    "auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "ddp_fork",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true", "ddp_notebook",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true", "ddp_spawn",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "deepspeed",
    "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
    "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload",
    "single_device", "single_tpu", "single_xla", "xla", "xla_debug",
)  # fmt: skip
DEVICE = choice("auto", "cpu", "cuda")  # where evaluate, extract run
DATASETS = ("market1501", "dukemtmc", "msmt17", "synthetic")
METRICS = ("cosine", "euclidean")
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")  # checkpoint.signals
# reidreg.training.module.REPORTED_METRICS on the validation hold-out; "best" is their maximum.
MONITORED = ("val/mAP", "val/R1", "val/R5", "val/R10", "val/mINP")
SEED = integer(min=0, max=2**32 - 1)  # numpy's and Lightning's seed range
PROBABILITY = number(ge=0, le=1)
DEVICES = any_of(
    choice("auto", -1),
    integer(min=1),
    list_of(integer(min=0)),
    Rule(lambda v: isinstance(v, str) and all(p.strip().isdigit() for p in v.split(",")), ""),
    expected="auto, -1 (all), a count >= 1, a list of device indices or a string such as '0,1'",
)

PATHS = {
    "paths.data_dir": string(),
    "paths.weights_dir": string(),
    "paths.output_dir": string(),
}
DATASET = {
    "dataset.name": choice(*DATASETS),
    "dataset.options": mapping(),
    "dataset.options.combine_val": boolean(),
}
# Checked by the dataset's own option check (reidreg.options.check: the synthetic generator's options).
OPEN_NODES = ("dataset.options",)

TRAIN_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "seed": SEED,
    "ckpt_path": optional(string()),
    "test": boolean(),
    "freeze_backbone_epochs": integer(min=0),  # and < trainer.max_epochs (relations.py)
    "regularizer": mapping(),  # each selected regularizer's options: its class's OPTION_RULES
    **PATHS,
    **DATASET,
    # data (dataset, dataset_options, root and seed repeat the options they interpolate)
    "data._target_": string(),
    "data.dataset": choice(*DATASETS),
    "data.dataset_options": mapping(),
    "data.root": string(),
    "data.seed": SEED,
    "data.height": integer(min=1),
    "data.width": integer(min=1),
    "data.hflip": boolean(),
    "data.pad_crop": boolean(),
    "data.padding": integer(min=0),
    "data.random_erasing": boolean(),
    "data.random_erasing_prob": PROBABILITY,
    "data.num_identities": integer(min=1),
    "data.num_instances": integer(min=1),
    "data.steps_per_epoch": optional(integer(min=1)),
    "data.skip_small_identities": boolean(),
    "data.val_identities": any_of(
        integer(min=0),
        number(gt=0, lt=1),
        expected="0 (no hold-out), a count of identities >= 1 or a fraction in (0, 1)",
    ),
    "data.val_drop_mislabeled": boolean(),
    "data.batch_size_test": integer(min=1),
    "data.num_workers": integer(min=0),
    "data.verify_images": boolean(),
    "data.pipeline": choice("auto", "cpu", "gpu"),
    # backbone and model
    "backbone._target_": string(),
    "backbone.name": string(),
    "backbone.pretrained": boolean(),
    "backbone.weights_file": optional(string()),
    "backbone.allow_download": boolean(),
    "backbone.last_stride_one": boolean(),
    "backbone.rbr": boolean(),
    "model._target_": string(),
    "model.regional_branches": boolean(),
    "model.num_stripes": integer(min=1),
    "model.stripe_channels": integer(min=1),
    "model.clip": boolean(),
    "model.compile": boolean(),
    # loss
    "loss._target_": string(),
    "loss.label_smoothing": number(ge=0, lt=1),
    "loss.triplet": boolean(),
    "loss.triplet_margin": optional(number(gt=0)),
    "loss.ce_weight": number(ge=0),
    "loss.triplet_weight": number(ge=0),
    # optimisation
    "optim.optimizer._target_": string(),
    "optim.optimizer._partial_": boolean(),
    "optim.optimizer.lr": number(gt=0),
    "optim.optimizer.betas": list_of(number(ge=0, lt=1), length=2),
    "optim.optimizer.momentum": number(ge=0, lt=1),
    "optim.optimizer.weight_decay": number(ge=0),
    "optim.schedule.warmup_epochs": integer(min=0),
    "optim.schedule.warmup_start_lr": number(ge=0),
    "optim.schedule.milestones": list_of(integer(min=0), increasing=True),
    "optim.schedule.gamma": number(gt=0, le=1),
    "optim.schedule.min_lr": number(ge=0),
    # trainer
    "trainer._target_": string(),
    "trainer.max_epochs": integer(min=1),
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.devices": DEVICES,
    "trainer.strategy": choice(*STRATEGIES),
    "trainer.num_nodes": integer(min=1),
    "trainer.precision": choice(*PRECISIONS),
    "trainer.check_val_every_n_epoch": integer(min=1),
    "trainer.log_every_n_steps": integer(min=1),
    "trainer.num_sanity_val_steps": integer(min=-1),
    "trainer.fast_dev_run": any_of(boolean(), integer(min=0)),
    "trainer.deterministic": any_of(boolean(), choice("warn")),
    "trainer.use_distributed_sampler": boolean(),
    "trainer.sync_batchnorm": boolean(),
    "trainer.enable_model_summary": boolean(),
    "trainer.default_root_dir": string(),
    # evaluation, checkpoints, run supervision
    "evaluation.metric": choice(*METRICS),
    "evaluation.flip": boolean(),
    "evaluation.rerank": boolean(),
    "checkpoint.monitor": choice(*MONITORED),
    "checkpoint.every_n_steps": integer(min=0),
    "checkpoint.signals": list_of(choice(*SIGNALS)),
    "checkpoint.requeue": boolean(),
    "divergence.factor": number(gt=1),
    "divergence.reference_steps": integer(min=1),
    "divergence.check_every_n_steps": integer(min=1),
    "distributed.timeout_s": number(gt=0),
    "progress.mode": choice("auto", "bar", "lines", "off"),
    "progress.every_n_steps": integer(min=1),
    "progress.every_n_seconds": optional(number(gt=0)),
    "progress.throughput_warmup_steps": integer(min=0),
    # loggers (logger=[csv,wandb])
    "logger.csv._target_": string(),
    "logger.csv.save_dir": string(),
    "logger.csv.name": string(),
    "logger.csv.version": any_of(string(), choice(""), integer(min=0)),
    "logger.wandb._target_": string(),
    "logger.wandb.project": string(),
    "logger.wandb.entity": optional(string()),
    "logger.wandb.save_dir": string(),
    "logger.wandb.group": optional(string()),
    "logger.wandb.job_type": optional(string()),
    "logger.wandb.tags": list_of(string()),
    "logger.wandb.log_model": any_of(boolean(), choice("all")),
}

EVALUATE_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "ckpt_path": string(),
    "metric": choice(*METRICS),
    "flip": boolean(),
    "rerank": boolean(),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "device": DEVICE,
    "seed": SEED,
    "ranked_list.num_queries": integer(min=0),
    "ranked_list.top_k": integer(min=1),
    "ranked_list.seed": SEED,
    **PATHS,
    "dataset": optional(mapping()),
    **DATASET,
    # set by dataset=synthetic for training; evaluation keeps the checkpoint's image size
    "data.height": integer(min=1),
    "data.width": integer(min=1),
    "attack": optional(mapping()),
    "attack.name": choice("fgsm", "pgd"),
    "attack.eps": number(ge=0, le=1),  # L-inf radius in [0, 1] pixel space
    "attack.step_size": optional(number(gt=0, le=1)),
    "attack.steps": optional(integer(min=1)),
    "attack.random_start": boolean(),
}

EXPORT_FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}  # format: file suffixes

EXTRACT_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "ckpt_path": string(),
    "images": string(),
    "out": file_name(*FEATURE_SUFFIXES),
    "flip": boolean(),
    "batch_size": integer(min=1),
    "num_workers": integer(min=0),
    "device": DEVICE,
    "on_error": choice("fail", "skip"),
}

EXPORT_OPTIONS: dict[str, Rule] = {
    "task_name": string(),
    "ckpt_path": string(),
    "format": choice(*EXPORT_FORMATS),
    "out": file_name(*(suffix for suffixes in EXPORT_FORMATS.values() for suffix in suffixes)),
    "flip": boolean(),
    "check_images": optional(string()),
}
