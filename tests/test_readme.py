"""Every ```bash block of README.md is checked the way its marker says, so the README's commands keep working.

The convention (an HTML comment on the line right before the block; invisible on GitHub, read here)::

    <!-- readme-test: run -->                 run every command as written
    <!-- readme-test: run: OVERRIDES -->      the same, with OVERRIDES appended to every `reidreg.train`
                                              command (e.g. `trainer.fast_dev_run=true`); the comment is the
                                              README's own statement that the test shortens the run
    <!-- readme-test: compose -->             (the default of an unmarked block) only check that each
                                              command is understood: `--cfg job` appended to the Hydra
                                              commands (train, evaluate, extract, export: the command line
                                              composes, every override names an existing option or group;
                                              a `-m` sweep is checked with the first value of each list),
                                              `--help` for `reidreg.report` and scripts; other programs
                                              (make, pip, wandb, mkdir) and `python -c` are not run;
                                              a `<placeholder>` is given its name as a stand-in value
    <!-- readme-test: skip: REASON -->        not run at all (installs, the test suite itself, a GPU,
                                              SLURM, a W&B account, real datasets); the reason is required

and ``slow`` after the mode (``run slow: ...``) marks a block for ``make test-slow`` only. A ``run`` block
is also checked in ``compose`` mode, so that the fast suite checks its commands even when it does not run
them.

How commands run: lines ending in ``\\`` are joined; ``python`` and ``.venv/bin/python`` become this test's
interpreter with this checkout on ``PYTHONPATH``; each command runs with bash in one scratch folder shared
by all blocks in README order (``sweeps/`` and ``benchmarks/`` linked in, ``./data`` empty at first, no
network: ``HF_HUB_OFFLINE=1``, no W&B credentials), so a later block can use what an earlier one wrote.
A ``<placeholder>`` or ``...`` inside a path of a ``run`` block stands for what a user would type after the
earlier commands: it is replaced by the newest existing path that matches it (``<x>`` → ``*``, ``...`` →
``**``). A command fails the test if it exits non-zero or takes over ``COMMAND_TIMEOUT_S``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND_TIMEOUT_S = 300
HYDRA_COMMANDS = ("reidreg.train", "reidreg.evaluate", "reidreg.extract", "reidreg.export")

_BLOCK = re.compile(
    r"(?:^<!--\s*readme-test:\s*(?P<marker>.*?)\s*-->\n)?^```bash\n(?P<body>.*?)^```", re.M | re.S
)
_NOT_IN_ID = re.compile(r"[^\w.=-]+")
_MARKER = re.compile(r"(?P<mode>run|compose|skip)(?P<slow>\s+slow)?\s*(?::\s*(?P<text>.*))?$")
_PYTHON = re.compile(r"(?<![\w./-])(?:\.venv/bin/)?python3?(?=\s)")
_PLACEHOLDER = re.compile(r"<[^<>\s]+>|(?<![\w.])\.\.\.(?=/)")
_SPACED_PLACEHOLDER = re.compile(r"<([^<>]+)>")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    mode: str  # run | compose | skip
    slow: bool
    text: str  # run: the overrides appended to reidreg.train commands; skip: the reason
    commands: tuple[str, ...]

    @property
    def id(self) -> str:
        first = self.commands[0] if self.commands else "(empty)"
        return f"L{self.line}-{self.mode}-{_NOT_IN_ID.sub('_', first)[:50]}"


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def _commands(body: str) -> tuple[str, ...]:
    """The block's commands, one per logical line; ``<sweep id>`` is written ``<sweep_id>``."""
    body = _SPACED_PLACEHOLDER.sub(lambda m: f"<{m[1].replace(' ', '_')}>", body)
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return tuple(command for line in joined.splitlines() if (command := _strip_comment(line).strip()))


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _BLOCK.finditer(text):
        marker = _MARKER.match(match["marker"] or "compose")
        if marker is None:
            raise ValueError(
                f"README.md line {text[: match.start()].count(chr(10)) + 1}: bad readme-test marker"
            )
        if marker["mode"] == "skip" and not marker["text"]:
            raise ValueError(f"README.md: a skipped block needs a reason: {match['marker']!r}")
        blocks.append(
            Block(
                line=text[: match.start("body")].count("\n"),
                mode=marker["mode"],
                slow=bool(marker["slow"]),
                text=marker["text"] or "",
                commands=_commands(match["body"]),
            )
        )
    return blocks


def _module(command: str) -> str | None:
    found = re.search(r"(?:^|\s)-m\s+(reidreg\.\w+)", command)
    return found[1] if found else None


def _first_sweep_values(command: str) -> str:
    """A ``-m`` sweep as one job: ``-m`` dropped, each ``key=a,b,c`` and ``'key=range(a,b)'`` cut to
    ``key=a`` (lists in [] kept)."""
    command = re.sub(r"\s-m(?=\s+(?!reidreg\.))", "", command)
    command = re.sub(r"'?([\w./+~-]+=)range\((-?\d+),[^)]*\)'?", r"\1\2", command)
    return re.sub(r"(?<=\s)([\w./+~-]+=)([^\s\[\]'\",]+),[^\s\[\]'\"]+", r"\1\2", command)


def compose_form(command: str) -> str | None:
    """The command that checks ``command`` without running it, or None when it is not checked."""
    command = _SPACED_PLACEHOLDER.sub(
        r"\1", command
    )  # a stand-in value: bash would read <x> as a redirection
    module = _module(command)
    if module in HYDRA_COMMANDS:
        return f"{_first_sweep_values(command)} --cfg job"
    if module is not None or re.match(r"python3?\s+\S+\.py\b", command):
        return f"{command} --help"
    return None


def _resolve_placeholders(command: str, cwd: Path) -> str:
    """Each path holding a ``<placeholder>`` or ``...`` → the newest existing path matching it in ``cwd``."""

    def newest(token: str) -> str:
        key, _, path = token.rpartition("=")
        pattern = _PLACEHOLDER.sub(lambda m: "**" if m[0] == "..." else "*", path)
        matches = sorted(cwd.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not matches:
            raise AssertionError(f"nothing in the scratch folder matches {path!r} (from {command!r})")
        return f"{key}{'=' if key else ''}{matches[-1].relative_to(cwd)}"

    return " ".join(newest(t) if _PLACEHOLDER.search(t) else t for t in command.split(" "))


def _with_overrides(command: str, overrides: str) -> str:
    return f"{command} {overrides}" if overrides and _module(command) == "reidreg.train" else command


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "REIDREG_"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", NETRC=str(cwd / "no-netrc"), OMP_NUM_THREADS="1")
    script = _PYTHON.sub(sys.executable, command)
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


BLOCKS = readme_blocks(README.read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    for name in ("sweeps", "benchmarks"):
        (folder / name).symlink_to(REPO / name)
    return folder


def _checks(blocks: list[Block]) -> list:
    """One check per block in its own mode; a ``run`` block is also composed, so that the fast suite checks
    its commands even when the run itself is ``slow``."""
    checks = []
    for block in blocks:
        if block.mode == "run":
            checks.append(pytest.param(block, "compose", id=f"{block.id}-compose"))
        checks.append(pytest.param(block, block.mode, id=block.id, marks=[pytest.mark.slow] * block.slow))
    return checks


@pytest.mark.parametrize(("block", "mode"), _checks(BLOCKS))
def test_readme_block(block: Block, mode: str, scratch: Path) -> None:
    if mode == "skip":
        pytest.skip(block.text)
    checked = 0
    for command in block.commands:
        if mode == "compose":
            command = compose_form(command)
            if command is None:
                continue
            cwd = REPO
        else:
            command, cwd = _resolve_placeholders(_with_overrides(command, block.text), scratch), scratch
        done = _run(command, cwd)
        checked += 1
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        assert done.returncode == 0, (
            f"README.md line {block.line}: `{command}` exited {done.returncode}:\n{tail}"
        )
    if checked == 0:
        pytest.skip("nothing to check in compose mode (no python command)")


def test_the_convention_parses_markers_placeholders_and_sweeps(tmp_path):
    text = (
        "```bash\npython -m reidreg.train -m regularizer=none,sgsl 'regularizer=[a,b]' seed=0,1  # x\n```\n"
        "<!-- readme-test: run slow: trainer.fast_dev_run=true -->\n```bash\n"
        "python -m reidreg.train a=1 \\\n    b=2\nmake test\n```\n"
        "<!-- readme-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n"
    )
    compose, run, skip = readme_blocks(text)
    assert (compose.mode, run.mode, run.slow, run.text, skip.text) == (
        "compose",
        "run",
        True,
        "trainer.fast_dev_run=true",
        "needs a GPU",
    )
    assert compose_form(compose.commands[0]) == (
        "python -m reidreg.train regularizer=none 'regularizer=[a,b]' seed=0 --cfg job"
    )
    assert compose_form("python -m reidreg.train -m 'seed=range(3,15)' x=1") == (
        "python -m reidreg.train seed=3 x=1 --cfg job"
    )
    assert run.commands == ("python -m reidreg.train a=1 b=2", "make test")
    assert _with_overrides(run.commands[0], run.text).endswith("b=2 trainer.fast_dev_run=true")
    assert compose_form("make test") is None
    (tmp_path / "outputs" / "train" / "d1" / "t1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "d1" / "t1" / "checkpoints" / "last.ckpt").touch()
    resolved = _resolve_placeholders(
        "x ckpt_path=outputs/train/<date>/<time>/checkpoints/last.ckpt", tmp_path
    )
    assert resolved == "x ckpt_path=outputs/train/d1/t1/checkpoints/last.ckpt"
    assert _resolve_placeholders("x ckpt_path=.../last.ckpt", tmp_path).endswith("t1/checkpoints/last.ckpt")
