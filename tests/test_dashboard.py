"""``python -m reidreg.dashboard`` on a real tiny study (2 methods × 2 seeds, trained for 2 epochs on
synthetic data): the W&B Report specification read back by wandb-workspaces' own models, with the study's
groups, panels and the report's numbers; no network without credentials or with --dry-run; and
``dashboard.html`` rendered by a headless Chromium (skipped where there is none) with every method."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb_workspaces.reports.v2 as wr

from reidreg.dashboard import DASHBOARD_FILE, MISSING_LIBRARY, SPEC_FILE, main, save_report
from reidreg.metric_keys import LAMBDA_MEDIAN_KEY
from reidreg.report import compare
from reidreg.reporting.table_text import primary_table
from reidreg.reporting.wandb_report import SECTIONS, report_from_spec
from reidreg.run_dir import CSV_METRICS
from reidreg.train import train
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
JOBS = [("none", 0), ("none", 1), ("adaptive_l2", 0), ("adaptive_l2", 1)]
METHODS = ["none", "adaptive_l2"]
BOOTSTRAP = ["--bootstrap-samples", "200"]  # the fewest the report accepts: the bootstrap is not tested here


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """4 run directories under ``study/``, trained and tested in this process, throughput measured."""
    root = tmp_path_factory.mktemp("dashboard")
    for index, (regularizer, seed) in enumerate(JOBS):
        train(
            compose_config(
                root / "work",
                f"regularizer={regularizer}",
                f"seed={seed}",
                "trainer.max_epochs=2",  # two validation points per run: a curve over epochs
                "progress.throughput_warmup_steps=0",  # the runs are shorter than the default warm-up
                f"paths.output_dir={root / 'study' / str(index)}",
            )
        )
    return root / "study"


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine without W&B credentials and without a chosen mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), PYTHONPATH=str(REPO))
    env.setdefault("MPLCONFIGDIR", str(Path.home() / ".config" / "matplotlib"))  # its font cache, kept
    return env


@pytest.fixture(scope="module")
def dashboard(study, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The command as a user types it, without credentials: writes beside the runs."""
    env = offline_env(tmp_path_factory.mktemp("home"))
    command = [sys.executable, "-m", "reidreg.dashboard", str(study), *BOOTSTRAP]
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    return study, result


def test_without_credentials_it_writes_the_spec_and_says_so_in_one_line(dashboard):
    study, result = dashboard
    for name in (DASHBOARD_FILE, SPEC_FILE, "report.md", "report.csv"):
        assert (study / name).is_file(), name
    said = [line for line in result.stdout.splitlines() if "W&B Report" in line]
    assert said == [
        f"W&B Report not saved (no W&B credentials: WANDB_API_KEY or `wandb login`): its "
        f"specification is in {study / SPEC_FILE}"
    ]


def _sections(report: wr.Report) -> dict[str, list]:
    """H2 title -> the blocks up to the next heading."""
    sections: dict[str, list] = {}
    current = None
    for block in report.blocks:
        if isinstance(block, wr.H2):
            current = sections.setdefault(str(block.text), [])
        elif isinstance(block, wr.H1):
            current = None
        elif current is not None:
            current.append(block)
    return sections


def test_spec_is_a_report_of_the_study_by_the_librarys_models(dashboard):
    study, _ = dashboard
    report = report_from_spec((study / SPEC_FILE).read_text())
    assert report.project == "reidreg" and report.title.startswith("reidreg: 2 methods on synthetic")
    assert [str(b.text) for b in report.blocks if isinstance(b, wr.H1)] == ["synthetic"]
    sections = _sections(report)
    assert list(sections) == list(SECTIONS)

    # Every grid selects the study's runs by the W&B groups their run.json records: the panels stay live.
    groups = {
        (study / str(i) / "run.json").read_text().split('"wandb_group": "')[1].split('"')[0] for i in range(4)
    }
    assert len(groups) == 2 and all(g.startswith("synthetic/") for g in groups)
    grids = [b for blocks in sections.values() for b in blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 4  # Δ mAP is the report's table, not a grid
    for grid in grids:
        (runset,) = grid.runsets
        assert re.fullmatch(r'Metric\("Group"\) in \[.*\]', str(runset.filters))
        assert set(re.findall(r"'([^']+)'", str(runset.filters))) == groups
        assert all(panel.groupby == "Group" for panel in grid.panels)

    def panels(title):
        (grid,) = [b for b in sections[title] if isinstance(b, wr.PanelGrid)]
        return grid.panels

    tests = panels(SECTIONS[0])
    assert [type(p) for p in tests] == [wr.BarPlot] * 3
    assert [p.metrics[0].name for p in tests] == ["test/mAP", "test/R1", "test/mINP"]
    (validation,) = panels(SECTIONS[2])
    assert (validation.x.name, [m.name for m in validation.y]) == ("epoch", ["val/mAP"])
    assert validation.groupby_rangefunc == "minmax"
    with (study / "2" / CSV_METRICS).open() as file:
        lambda_columns = [key for key in next(csv.reader(file)) if LAMBDA_MEDIAN_KEY.match(key)]
    assert lambda_columns and [[m.name for m in p.y] for p in panels(SECTIONS[3])] == [
        [k] for k in lambda_columns
    ]
    cost = panels(SECTIONS[4])
    assert [p.metrics[0].name for p in cost] == ["performance/train_img_per_s", "performance/peak_memory_mib"]


def test_the_delta_table_is_the_reports_own_numbers(dashboard):
    study, _ = dashboard
    report = report_from_spec((study / SPEC_FILE).read_text())
    (table,) = [b for b in _sections(report)[SECTIONS[1]] if isinstance(b, wr.MarkdownBlock)]
    comparison = compare([study], samples=200)
    assert table.text == primary_table(comparison.rows)
    with (study / "report.csv").open() as file:
        delta = {row["method"]: row["mAP_delta"] for row in csv.DictReader(file)}["adaptive_l2"]
    assert f"| {float(delta):+.2f}" in table.text


def test_dry_run_never_opens_a_connection(study, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # even with credentials, --dry-run stays offline
    assert main([str(study), "--dry-run", "--out", str(tmp_path), "--entity", "me", *BOOTSTRAP]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "W&B Report" in line]
    assert said == [f"W&B Report not saved (--dry-run): its specification is in {tmp_path / SPEC_FILE}"]
    report = report_from_spec((tmp_path / SPEC_FILE).read_text())
    assert report.entity == "me" and report.project == "reidreg"  # the runsets show the Report's project


def test_saving_gives_up_after_its_timeout():
    class Unanswered:
        entity, project, blocks = "me", "reidreg", []

        def save(self):
            time.sleep(30)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        save_report(Unanswered(), timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_bad_input_is_one_error_line_before_any_work(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directory")
    assert list(empty.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        main([str(empty), "--no-such-option"])
    assert exit_info.value.code == 2
    assert "error: unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_dashboard_html_loads_nothing_from_elsewhere(dashboard):
    page = (dashboard[0] / DASHBOARD_FILE).read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") or s == "report.md" for s in sources)
    assert not re.search(r"https?://|<link|@import|url\(", page)


def chromium(page: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``: no network services, no profile of its own, logs on stderr."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",  # lets the page's load handler run before the dump
        *options,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_a_headless_browser_shows_every_section_with_every_method(dashboard, tmp_path):
    page = dashboard[0] / DASHBOARD_FILE
    result = chromium(page, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ":CONSOLE" not in result.stderr  # no script error, no failed load
    dom = result.stdout
    decoded, total = map(int, re.search(r'data-images="(\d+)/(\d+)"', dom).groups())
    assert total >= 4 and decoded == total  # test metrics, validation, λ, cost
    panels = re.findall(r'<section class="panel"><h3>(.*?)</h3>(.*?)</section>', dom, re.DOTALL)
    assert [title for title, _ in panels] == list(SECTIONS)
    for title, body in panels:
        shown = re.findall(r'<li class="method">([^:<]+):', body)
        assert shown == METHODS, title

    screenshot = Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    result = chromium(
        page, tmp_path, "--hide-scrollbars", "--window-size=1280,2600", f"--screenshot={screenshot}"
    )
    assert result.returncode == 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_wandb_workspaces_one_line_names_the_extra(study, tmp_path, monkeypatch, capsys):
    import reidreg.reporting

    monkeypatch.delattr(reidreg.reporting, "wandb_report")
    monkeypatch.setitem(sys.modules, "reidreg.reporting.wandb_report", None)  # as if it could not import
    assert main([str(study), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {MISSING_LIBRARY}\n" and list(tmp_path.iterdir()) == []
