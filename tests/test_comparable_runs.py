"""Which runs the report may average and compare: a method is its non-operational options (the definition
resume uses), and runs of one dataset that measured different things are refused unless allowed.
Hand-made run directories (``make_run``/``write_run_json`` of test_report.py) with known differences."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from reidreg.errors import ConfigError
from reidreg.experiment import OPERATIONAL, is_operational, resume_may_change
from reidreg.report import report
from reidreg.reporting.gather import gather
from reidreg.reporting.methods import method_labels
from tests.test_report import PROVENANCE, make_run, write_run_json

DEVICE_H100 = {"type": "cuda", "model": "NVIDIA H100 80GB HBM3", "count": 1, "capability": "9.0"}


def _study(root: Path, specs: list[tuple[str, int, dict[str, Any], dict[str, Any]]]) -> list[Path]:
    """Finished runs: (regularizer, seed, config settings, provenance changes) each."""
    runs = []
    for index, (regularizer, seed, config, changes) in enumerate(specs):
        run = make_run(root / f"run{index}", regularizer=regularizer, seed=seed, job_num=index, config=config)
        runs.append(write_run_json(run, PROVENANCE, changes=changes))
    return runs


def test_operational_settings_never_split_a_method_but_the_run_length_does(tmp_path):
    # The none runs differ only in progress display, loader workers and checkpoint cadence.
    specs = [
        ("none", 0, {"progress.throughput_warmup_steps": 20, "data.num_workers": 2}, {}),
        ("none", 1, {"progress.throughput_warmup_steps": 5, "data.num_workers": 8}, {}),
        ("none", 2, {"checkpoint.every_n_steps": 0, "trainer.log_every_n_steps": 1}, {}),
        ("sgsl", 0, {"progress.throughput_warmup_steps": 5}, {}),
        ("sgsl", 1, {"progress.throughput_warmup_steps": 20}, {}),
    ]
    _study(tmp_path, specs)
    runs = gather([tmp_path]).finished
    assert [method_labels(runs)[id(run)] for run in runs] == ["none"] * 3 + ["sgsl"] * 2
    text, _ = report([tmp_path], plots=False)
    assert "| none | synthetic | 3/3 |" in text and "| sgsl | synthetic | 2/2 |" in text

    # A longer run is another experiment (resume may lengthen a run, but that changes its numbers).
    make_run(tmp_path / "longer", seed=3, job_num=5, config={"trainer.max_epochs": 40})
    runs = gather([tmp_path]).finished
    assert "none trainer.max_epochs=40" in set(method_labels(runs).values())


def test_resume_may_change_every_operational_option_and_the_run_length_only():
    assert all(resume_may_change(key) and is_operational(key) for key in OPERATIONAL)
    assert is_operational("progress.throughput_warmup_steps") and is_operational("logger.wandb.project")
    assert resume_may_change("trainer.max_epochs") and not is_operational("trainer.max_epochs")
    for key in ("seed", "regularizer.constant_l2.lam", "data.num_instances", "trainer.precision"):
        assert not resume_may_change(key) and not is_operational(key)


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("dataset content (image bytes SHA-256)", {"dataset.content_hash": "b" * 64}),
        ("dataset files (listing SHA-256)", {"dataset.listing_sha256": "1" * 64}),
        ("precision", {"precision": "bf16-mixed"}),
        ("device class", {"device": DEVICE_H100}),
    ],
)
def test_runs_that_measured_different_things_are_refused_naming_field_and_runs(tmp_path, field, changes):
    same = {"dataset.content_hash": "a" * 64}
    specs = [("none", 0, {}, same), ("none", 1, {}, same), ("sgsl", 0, {}, same), ("sgsl", 1, {}, changes)]
    _study(tmp_path, specs)
    with pytest.raises(ConfigError) as refused:
        report([tmp_path], plots=False)
    message = str(refused.value)
    assert "\n" not in message and "--allow-mixed" in message
    runs_text = r"\(3 runs: `run0` \(none, seed 0\)"
    assert re.search(rf"synthetic: runs differ in {re.escape(field)}: .*{runs_text}", message)
    assert "(1 run: `run3` (sgsl, seed 1))" in message
    assert not (tmp_path / "report.md").exists()

    text, _ = report([tmp_path], plots=False, allow_mixed=True)
    mixed = text.split("Mixed comparison (--allow-mixed)")[1].split("| method |")[0]
    assert f"synthetic: runs differ in {field}" in mixed and "`run3` (sgsl, seed 1)" in mixed


def test_held_out_identities_must_agree_between_runs_of_one_seed(tmp_path):
    by_seed = {0: "0" * 64, 1: "1" * 64}  # differ between seeds by design
    specs = [
        (regularizer, seed, {}, {"dataset.held_out_ids_sha256": by_seed[seed]})
        for regularizer in ("none", "sgsl")
        for seed in (0, 1)
    ]
    runs = _study(tmp_path, specs)
    text, _ = report([tmp_path], plots=False)
    assert "Mixed" not in text and "held-out" not in text

    write_run_json(runs[3], PROVENANCE, changes={"dataset.held_out_ids_sha256": "f" * 64})
    with pytest.raises(ConfigError, match="synthetic, seed 1: runs differ in held-out validation identities"):
        report([tmp_path], plots=False)


def test_unrecorded_fields_and_cpu_models_are_not_refused(tmp_path):
    # An older run without a content hash, and two CPU models (same device class): comparable; the CPU
    # model is still warned about.
    specs = [
        ("none", 0, {}, {"dataset.content_hash": "a" * 64}),
        ("none", 1, {}, {"device.model": "AMD EPYC 9654"}),  # no content_hash recorded
    ]
    _study(tmp_path, specs)
    text, _ = report([tmp_path], plots=False)
    assert "Mixed" not in text
    assert "runs differ in device model: Xeon (1 run: `run0` (none, seed 0)); AMD EPYC 9654" in text
