"""Two "nodes" on one machine, as a cluster launches them: ``trainer.num_nodes=2 trainer.devices=1``, one
process per node with ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` (Lightning's LightningEnvironment),
CPU and gloo, sharing the run directory as nodes share it on a cluster file system.

The pair must be the same run as one node with ``trainer.devices=2`` (every tensor, the CSV, the test);
a node killed mid-epoch must take the other down within a bound; the pair relaunched with the README's
resume command must end as if never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_phases import (
    DDP_RUN,
    alive,
    assert_same_ddp_run_resumed_mid_epoch,
    assert_same_run,
    descendants,
)
from tests.test_resume import REPO, cli, wait_for_mid_epoch_checkpoint

# The same global batch as DDP_RUN's two devices: P identities per process, two processes. One CPU
# thread per process on both sides: the float rounding of a CPU kernel depends on its thread count.
NODES_RUN = [
    *(o for o in DDP_RUN if not o.startswith(("trainer.devices", "trainer.strategy"))),
    "trainer.num_nodes=2",
    "trainer.devices=1",
]
THREADS = {"OMP_NUM_THREADS": "1"}
#: How long the surviving node may take to exit once the other is killed (measured: see the README).
EXIT_BOUND_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_nodes(
    run_dir: Path, *overrides: str, data_dir: Path, torchrun: bool = False
) -> list[subprocess.Popen]:
    """The two node processes of one run, started as a cluster starts them: with MASTER_ADDR, MASTER_PORT
    and NODE_RANK set (Lightning's LightningEnvironment), or by ``torchrun`` (TorchElasticEnvironment)."""
    port = str(free_port())
    if not torchrun:
        return [
            cli(
                run_dir,
                *overrides,
                data_dir=data_dir,
                background=True,
                env={**THREADS, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node)},
            )
            for node in (0, 1)
        ]
    return [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run"),  # the program of the ``torchrun`` command
                *("--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}"),
                *("--master-addr=127.0.0.1", f"--master-port={port}", "-m", "reidreg.train"),
                *(overrides),
                *(f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **THREADS},
        )
        for node in (0, 1)
    ]


def finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Each node's exit status, standard output and error, once both have ended."""
    ended = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        ended.append((node.returncode, stdout.decode(), stderr.decode()))
    return ended


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory) -> tuple[Path, Path]:
    """The reference: one node, ``trainer.devices=2`` (and the shared data folder)."""
    base = tmp_path_factory.mktemp("multinode")
    result = cli(base / "two_devices", *DDP_RUN, data_dir=base / "data", env=THREADS)
    assert result.returncode == 0, result.stderr
    return base / "two_devices", base / "data"


@pytest.mark.slow  # a 2-process run and a pair of node processes
@pytest.mark.parametrize("torchrun", [False, True], ids=["environment", "torchrun"])
def test_two_nodes_are_the_same_run_as_two_devices_on_one_node(tmp_path, two_devices, torchrun):
    reference, data_dir = two_devices
    run_dir = tmp_path / "run"
    nodes = launch_nodes(run_dir, *NODES_RUN, data_dir=data_dir, torchrun=torchrun)
    (code0, out0, err0), (code1, out1, err1) = finish(nodes)
    assert (code0, code1) == (0, 0), err0 + err1
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert out0.count("subset  | ids") == 1 and out1 == ""  # node 1 prints nothing rank 0 prints


@pytest.mark.slow  # two pairs of node processes
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_node_takes_the_other_down_and_the_pair_resumes_exactly(tmp_path, two_devices, killed):
    reference, data_dir = two_devices
    run_dir = tmp_path / "run"
    nodes = launch_nodes(run_dir, *NODES_RUN, data_dir=data_dir)
    try:
        wait_for_mid_epoch_checkpoint(nodes[0], run_dir, steps_per_epoch=8)
        processes = descendants(nodes[0].pid) | descendants(nodes[1].pid)  # their loader workers
    finally:
        nodes[killed].kill()
    start = time.monotonic()
    survivor = nodes[1 - killed]
    survivor.wait(timeout=EXIT_BOUND_S)  # (its output is a few lines: the pipes cannot fill)
    took = time.monotonic() - start
    (_, _, err0), (_, _, err1) = finish(nodes)
    while any(alive(pid) for pid in processes) and time.monotonic() - start < took + 15:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in processes), "a loader worker outlived its node"
    assert survivor.returncode == 1, err0 + err1
    # Node 0 (global rank 0) records what it saw; a killed node 0 can record nothing, as a killed process.
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == ("failed" if killed == 1 else "running"), record["reason"]

    # The README's resume command on both nodes, as the cluster relaunches the job.
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    (code0, _, err0), (code1, _, err1) = finish(
        launch_nodes(tmp_path / "fresh", ckpt, "trainer.num_nodes=2", "trainer.devices=1", data_dir=data_dir)
    )
    assert (code0, code1) == (0, 0), err0 + err1
    assert not (tmp_path / "fresh").exists()
    assert_same_ddp_run_resumed_mid_epoch(run_dir, reference)


@pytest.mark.parametrize(
    ("nodes", "environment", "message"),
    [
        (2, {}, "trainer.num_nodes=2: the nodes cannot find each other without MASTER_ADDR, MASTER_PORT"),
        # One node declared, a second one started: it would train alone in node 0's folder.
        (1, {"NODE_RANK": "1"}, "trainer.num_nodes=1: this process has node rank 1 (NODE_RANK/GROUP_RANK)"),
    ],
)
def test_a_multi_node_launch_that_cannot_work_is_refused_in_one_line(tmp_path, nodes, environment, message):
    result = cli(tmp_path / "run", f"trainer.num_nodes={nodes}", data_dir=tmp_path / "data", env=environment)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_multi_node_run_without_its_own_run_dir_is_refused(tmp_path):
    """Hydra's default run directory is named by each process's clock: the nodes would write to two."""
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NODE_RANK": "0"}
    command = [sys.executable, "-m", "reidreg.train", "trainer.num_nodes=2", f"paths.data_dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=environment)
    assert result.returncode == 2, result.stderr
    assert "give every process the same hydra.run.dir=<run dir>" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a pair of node processes, one of them stopped for distributed.timeout_s
def test_a_hung_node_ends_the_run_after_the_collective_timeout(tmp_path, two_devices):
    """A node that stops answering without closing its connections (SIGSTOP here; a frozen machine or a
    network partition on a cluster) is noticed only by the timeout of the collective the others wait in."""
    _, data_dir = two_devices
    run_dir = tmp_path / "run"
    nodes = launch_nodes(run_dir, *NODES_RUN, "distributed.timeout_s=10", data_dir=data_dir)
    try:
        wait_for_mid_epoch_checkpoint(nodes[0], run_dir, steps_per_epoch=8)
        nodes[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        nodes[0].wait(timeout=EXIT_BOUND_S)
        took = time.monotonic() - start
    finally:
        nodes[1].kill()
    (code, _, err), _ = finish(nodes)
    assert code == 1 and 10 <= took < 10 + EXIT_BOUND_S, (took, err)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "Timed out" in record["reason"]
