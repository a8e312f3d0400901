"""Wall time of ``python -m reidreg.report`` on a fake study with MSMT17-sized per-query results.

Builds a study on disk as ``reidreg.train`` leaves it (config.yaml, run.json, test_metrics.json and
test_per_query.npz per run): by default 5 methods × 9 seeds = 45 runs, each with 11,659 queries of
3,060 identities (MSMT17's test split), then times the report end to end, as a user types it (a fresh
process: imports, gathering, statistics, the bootstrap, the plots), ``--repeats`` times, and prints the
median and the size of one per-query file.

    python benchmarks/report_speed.py                       # 5 methods x 9 seeds
    python benchmarks/report_speed.py --methods 3 --seeds 15

The fake scores have the structure of a real study: each identity has its own difficulty, each seed a
shift shared by every method (what pairing removes), each method a small effect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from reidreg.per_query import PerQuery
from reidreg.run_dir import PER_QUERY_FILE, RUN_FILE, TEST_METRICS_FILE

MSMT17 = {"num_queries": 11_659, "num_ids": 3_060}
METHODS = ("none", "constant_l2", "adaptive_l2", "sgsl", "sgp", "linr", "adversarial")


def write_study(
    root: Path,
    *,
    methods: dict[str, float],
    seeds: list[int],
    num_queries: int,
    num_ids: int,
    seed: int = 0,
    seed_spread: float = 0.01,
) -> list[Path]:
    """One run directory per method × seed under ``root``; ``methods``: name -> effect on every AP."""
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(0, num_ids, num_queries))
    camid = rng.integers(0, 15, num_queries)
    valid = rng.random(num_queries) > 0.005
    difficulty = rng.normal(0.0, 0.15, num_ids)[pid]  # queries of one person are alike
    seed_shift = {s: rng.normal(0.0, seed_spread) for s in seeds}  # shared by every method
    run_dirs = []
    for method_index, (method, effect) in enumerate(methods.items()):
        for seed_index, run_seed in enumerate(seeds):
            noise = rng.normal(0.0, 0.1, num_queries)
            ap = np.clip(0.55 + difficulty + seed_shift[run_seed] + effect + noise, 0.0, 1.0)
            first = np.where(valid, rng.geometric(np.clip(ap, 0.05, 1.0)), 0)
            per_query = PerQuery(
                query_index=np.arange(num_queries),
                pid=pid,
                camid=camid,
                valid=valid,
                ap=np.where(valid, ap, np.nan),
                inp=np.where(valid, ap * 0.6, np.nan),
                first_match_rank=first,
            )
            run_dir = root / str(method_index * len(seeds) + seed_index)
            run_dir.mkdir(parents=True)
            config = {
                "seed": run_seed,
                "test": True,
                "dataset": {"name": "msmt17", "options": {}},
                "data": {"seed": run_seed},
                "regularizer": {} if method == "none" else {method: {"weight": 1.0}},
            }
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
            per_query.save(run_dir / PER_QUERY_FILE)
            metrics = {
                "test/mAP": per_query.mean_ap(),
                "test/R1": float(np.mean(first[valid] == 1)),
                "test/mINP": float(per_query.inp[valid].mean()),
                "num_valid_queries": per_query.num_valid,
                "num_queries": num_queries,
            }
            (run_dir / TEST_METRICS_FILE).write_text(json.dumps(metrics))
            speed = float(rng.normal(200.0, 5.0))
            performance = {
                "train_img_per_s": speed,
                "train_ms_per_step": 64_000 / speed,
                "peak_memory_mib": 900.0,
            }
            (run_dir / RUN_FILE).write_text(json.dumps({"status": "finished", "performance": performance}))
            run_dirs.append(run_dir)
    return run_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=int, default=5, help=f"at most {len(METHODS)}")
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    methods = {name: 0.002 * index for index, name in enumerate(METHODS[: args.methods])}
    with tempfile.TemporaryDirectory() as folder:
        study = Path(folder) / "study"
        runs = write_study(study, methods=methods, seeds=list(range(args.seeds)), **MSMT17)
        size = (runs[0] / PER_QUERY_FILE).stat().st_size
        command = [sys.executable, "-m", "reidreg.report", str(study), "--out", str(Path(folder) / "out")]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=os.environ)
            times.append(time.perf_counter() - start)
    print(
        f"{len(runs)} runs ({args.methods} methods x {args.seeds} seeds), {MSMT17['num_queries']} queries "
        f"of {MSMT17['num_ids']} identities each; per-query file {size / 1e6:.3f} MB"
    )
    print(
        f"python -m reidreg.report: median {statistics.median(times):.2f} s over {args.repeats} runs "
        f"({', '.join(f'{t:.2f}' for t in times)}); {os.cpu_count()} CPU(s)"
    )


if __name__ == "__main__":
    main()
