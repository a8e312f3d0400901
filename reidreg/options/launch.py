"""How the processes of a multi-node run find each other: checked against the environment before any work.

Lightning picks the cluster environment from the process's variables: SLURM's (``SLURM_NTASKS``, as
``lightning_fabric``'s ``SLURMEnvironment.detect``), torchrun's (``RANK``, ``GROUP_RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, as ``TorchElasticEnvironment.detect``), or else its ``LightningEnvironment``, which
reads ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` that the user sets on every node. Without them
node 0 would pick a random port and wait for the other nodes until the collective's timeout (30 min);
with a ``NODE_RANK`` or ``WORLD_SIZE`` that does not fit the trainer's topology, nodes would train as
separate runs in one directory, or Lightning would refuse only after the data was prepared. And every
process of the run must write to one run directory: Hydra's default ``hydra.run.dir`` is named by each
process's own clock, so processes that another launcher started need it given. Standard library only
(the options are checked before torch loads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

TORCHRUN_VARIABLES = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
NODE_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def launch_problems(valid: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> list[str]:
    """What keeps ``trainer.num_nodes`` × ``trainer.devices`` processes from meeting, one line each."""
    nodes = valid.get("trainer.num_nodes", 1)
    devices = valid.get("trainer.devices")
    processes = nodes * devices if isinstance(devices, int) and devices > 0 else None
    managed = "SLURM_NTASKS" in environ or all(name in environ for name in TORCHRUN_VARIABLES)
    problems = []
    missing = [name for name in NODE_VARIABLES if name not in environ]
    if nodes > 1 and not managed and missing:
        problems.append(
            f"trainer.num_nodes={nodes}: the nodes cannot find each other without {', '.join(missing)}; "
            "start the run with torchrun or under SLURM, or set MASTER_ADDR (node 0's address), "
            "MASTER_PORT (a free port there) and NODE_RANK (0 .. num_nodes-1) on every node"
        )
    node_rank = environ.get("NODE_RANK", environ.get("GROUP_RANK"))
    if node_rank is not None and not (node_rank.isdigit() and int(node_rank) < nodes):
        problems.append(
            f"trainer.num_nodes={nodes}: this process has node rank {node_rank} (NODE_RANK/GROUP_RANK); "
            f"expected 0 .. {nodes - 1} (set trainer.num_nodes to the number of nodes)"
        )
    world = environ.get("WORLD_SIZE")
    if processes is not None and world is not None and world != str(processes):
        problems.append(
            f"trainer.num_nodes={nodes} trainer.devices={devices}: {processes} processes, but the launcher "
            f"set WORLD_SIZE={world}; expected trainer.num_nodes × trainer.devices = WORLD_SIZE"
        )
    return problems


def run_dir_problem(run_dir_template: str, nodes: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """A new run whose processes a launcher other than Lightning's starts (other nodes, torchrun) would
    name its directory by each process's clock (``${now:...}`` in ``hydra.run.dir``): one line, else None.
    Lightning's own launcher hands its ranks the main process's ``hydra.run.dir``."""
    external = (isinstance(nodes, int) and nodes > 1) or all(name in environ for name in TORCHRUN_VARIABLES)
    if not external or "${now:" not in run_dir_template:
        return None
    return (
        f"hydra.run.dir={run_dir_template}: each process of a run with several nodes or started by torchrun "
        "would name its own directory by its clock; give every process the same hydra.run.dir=<run dir>"
    )
