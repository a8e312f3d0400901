"""``reidreg.report --plan``: the seeds to add and the reidreg.train command, on a fabricated study."""

import csv
import subprocess
from pathlib import Path

import pytest
import yaml

from reidreg.report import main
from reidreg.reporting.plan import seed_list, seed_sweep
from tests.test_report import make_run

BASE = [0.50, 0.52, 0.51]
GAINS = {"sgsl": [0.008, 0.004, 0.009], "adaptive_l2": [0.001, -0.004, 0.006]}


def _study(root: Path) -> Path:
    """A multirun started from a study file: none, sgsl, adaptive_l2 × seeds 0-2, plus a failed seed 3."""
    sweep, num = root / "sweep", 0
    for regularizer, gains in [("none", [0, 0, 0]), *GAINS.items()]:
        for seed, (base, gain) in enumerate(zip(BASE, gains, strict=True)):
            overrides = [f"regularizer={regularizer}", f"seed={seed}", "dataset=synthetic"]
            make_run(
                sweep / str(num),
                regularizer=regularizer,
                seed=seed,
                mAP=base + gain,
                job_num=num,
                overrides=overrides,
            )
            num += 1
    make_run(
        sweep / str(num),
        regularizer="sgsl",
        seed=3,
        mAP=None,
        job_num=num,
        overrides=["regularizer=sgsl", "seed=3", "dataset=synthetic"],
    )
    for run_dir in sweep.iterdir():  # launched with --config-dir sweeps --config-name compare_regularizers
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        hydra = yaml.safe_load(hydra_file.read_text())
        hydra["hydra"]["job"]["config_name"] = "compare_regularizers"
        hydra["hydra"]["runtime"]["config_sources"] = [
            {"path": "file:///work/repo/sweeps", "schema": "file", "provider": "command-line"}
        ]
        hydra_file.write_text(yaml.safe_dump(hydra))
    return sweep


def test_plan_prints_new_seeds_and_the_command_per_method(tmp_path, capsys):
    sweep = _study(tmp_path)
    assert main([str(sweep), "--no-plots", "--plan", "--bootstrap-samples", "100"]) == 0
    out = capsys.readouterr().out
    notes = out[out.index("## Notes") :]
    # sgsl: d = +0.8, +0.4, +0.9 mAP: d_z = 2.65, 4 pairs; adaptive_l2: d = +0.1, -0.4, +0.6: d_z = 0.2
    assert (
        "sgsl vs none on synthetic: about 4 pairs would detect +0.70 mAP at α = 0.05 with 80% power" in notes
    )
    plan = out[out.index("## Plan") :]
    prefix = "python -m reidreg.train -m --config-dir /work/repo/sweeps --config-name compare_regularizers"
    # seed 3 is taken (a failed sgsl run), so the new seeds start at 4
    assert f"`{prefix} regularizer=sgsl dataset=synthetic seed=4`" in plan
    adaptive = next(line for line in plan.splitlines() if line.startswith("- adaptive_l2"))
    wanted = int(adaptive.split(": ")[1].split(" ")[0])
    assert wanted > 100  # a d_z of 0.2 needs about 200 pairs
    # hundreds of new seeds are a Hydra range, not a list
    assert f"`{prefix} regularizer=adaptive_l2 dataset=synthetic 'seed=range(4,{4 + wanted})'`" in plan
    assert f": {wanted} seed(s), 4–{3 + wanted}" in adaptive
    baseline = next(line for line in plan.splitlines() if line.startswith("- none"))
    assert f": {wanted} seed(s)" in baseline  # the baseline pairs with the most demanding comparison
    assert f"`{prefix} regularizer=none dataset=synthetic 'seed=range(4,{4 + wanted})'`" in plan


def test_plan_commands_reach_hydra_as_written_when_pasted_into_bash(tmp_path, capsys):
    """Unquoted, ``seed=range(4,9)`` is a bash syntax error and ``key=[0.1,0.2]`` a glob pattern."""
    sweep = _study(tmp_path)
    for run_dir in sweep.iterdir():  # a list-valued option among the study's overrides
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text())
        overrides_file.write_text(yaml.safe_dump([*overrides, "regularizer.sgsl.lam=[0.1,0.2]"]))
    (tmp_path / "regularizer.sgsl.lam=0").touch()  # a file that the unquoted pattern would match
    assert main([str(sweep), "--no-plots", "--plan", "--bootstrap-samples", "100"]) == 0
    plan = capsys.readouterr().out.split("## Plan")[1]
    commands = [line.strip().strip("`") for line in plan.splitlines() if line.startswith("  `python")]
    assert len(commands) == 3
    seed_arguments = []
    for command in commands:
        pasted = subprocess.run(
            ["bash", "-c", f'set -- {command}; printf "%s\\n" "$@"'],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        arguments = pasted.stdout.splitlines()
        assert arguments[:4] == ["python", "-m", "reidreg.train", "-m"], command
        assert "regularizer.sgsl.lam=[0.1,0.2]" in arguments, command
        seed_arguments.append(arguments[-1])
    # sgsl needs one more seed; adaptive_l2 and its baseline hundreds, as a range
    one, *ranges = sorted(seed_arguments)
    assert one == "seed=4" and ranges[0].startswith("seed=range(4,") and ranges[0] == ranges[1]


def test_seed_sweeps_are_ranges_only_for_three_or_more_consecutive_seeds():
    assert seed_sweep([4]) == "seed=4" and seed_list([4]) == "4"
    assert seed_sweep([4, 5]) == "seed=4,5" and seed_list([4, 5]) == "4, 5"
    assert seed_sweep([4, 6, 7]) == "seed=4,6,7" and seed_list([4, 6, 7]) == "4, 6, 7"
    assert seed_sweep([4, 5, 6]) == "seed=range(4,7)" and seed_list([4, 5, 6]) == "4–6"


def test_sequential_plan_adds_one_seed_where_the_rule_says_continue(tmp_path, capsys):
    sweep = _study(tmp_path)
    assert main([str(sweep), "--no-plots", "--plan", "--sequential", "--bootstrap-samples", "100"]) == 0
    out = capsys.readouterr().out
    assert "sgsl vs none on synthetic" in out and "sequential: continue" in out
    plan = out[out.index("## Plan") :]
    assert "regularizer=sgsl dataset=synthetic seed=4`" in plan
    assert "regularizer=adaptive_l2 dataset=synthetic seed=4`" in plan
    with (sweep / "report.csv").open(newline="") as file:
        records = {record["method"]: record for record in csv.DictReader(file)}
    assert (records["sgsl"]["mAP_pairs_needed"], records["sgsl"]["mAP_sequential"]) == ("4", "continue")
    assert records["none"]["mAP_pairs_needed"] == ""


def test_bad_power_and_looks_are_refused_before_any_work(tmp_path, capsys):
    for argv, message in [
        (["--power", "1.5"], "--power must be between 0 and 1 (got 1.5)"),
        (["--min-seeds", "5", "--max-seeds", "4"], "--min-seeds must be at least 2 and at most --max-seeds"),
        (["--max-seeds", "51"], "itself at most 50 (got 3 and 51)"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main([str(tmp_path / "nowhere"), *argv])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
