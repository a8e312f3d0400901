"""Wall time and peak memory of ``rank_metrics`` and ``evaluate`` on a random MSMT17-sized problem.

Default sizes are MSMT17's test split: 11,659 queries x 82,161 gallery images, 3,060 identities, 15
cameras (the float32 distance matrix is 3.8 GB). Each measured function runs in a fresh subprocess that
first builds its inputs, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; on systems
without it the peak since start is used, which overstates), runs the function once and reports
``peak RSS - RSS after building the inputs``: the working memory the function itself needs (torch
allocations included, which tracemalloc would miss).

    python benchmarks/eval_speed.py                  # MSMT17-sized, evaluate with 2048-d features
    python benchmarks/eval_speed.py --small          # quick run (Market-1501-sized)
    python benchmarks/eval_speed.py --dim 256 --baseline   # also time a per-row argsort evaluator

``--baseline`` adds the classic sort-based evaluator (a stable argsort of every gallery row, then the
matches' positions), which is what torchreid's evaluator does, written row by row to bound its memory.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

MSMT17 = {"num_query": 11659, "num_gallery": 82161, "num_ids": 3060, "num_cameras": 15}
MARKET1501 = {"num_query": 3368, "num_gallery": 15913, "num_ids": 751, "num_cameras": 6}
FUNCTIONS = ("rank_metrics", "evaluate", "baseline")


def memory_kib(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status (in KiB), e.g. VmRSS (current) or VmHWM (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def build_labels(sizes: dict, generator: torch.Generator) -> dict:
    """Random pids / cameras; every query identity also appears in the gallery."""
    gallery_pids = torch.randint(0, sizes["num_ids"], (sizes["num_gallery"],), generator=generator)
    return {
        "q_pids": gallery_pids[
            torch.randint(0, sizes["num_gallery"], (sizes["num_query"],), generator=generator)
        ],
        "g_pids": gallery_pids,
        "q_camids": torch.randint(0, sizes["num_cameras"], (sizes["num_query"],), generator=generator),
        "g_camids": torch.randint(0, sizes["num_cameras"], (sizes["num_gallery"],), generator=generator),
    }


def sort_based_metrics(distmat: np.ndarray, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """Reference evaluator: full stable argsort per gallery row (the O(G log G)-per-query approach)."""
    q_pids, g_pids, q_camids, g_camids = (np.asarray(x) for x in (q_pids, g_pids, q_camids, g_camids))
    average_precisions, inverse_negative_penalties, first_ranks = [], [], []
    for query in range(len(distmat)):
        order = np.argsort(distmat[query], kind="stable")
        same_pid = g_pids[order] == q_pids[query]
        is_match = same_pid[~(same_pid & (g_camids[order] == q_camids[query]))]
        match_ranks = np.flatnonzero(is_match) + 1
        if match_ranks.size:
            average_precisions.append(np.mean(np.arange(1, match_ranks.size + 1) / match_ranks))
            inverse_negative_penalties.append(match_ranks.size / match_ranks[-1])
            first_ranks.append(match_ranks[0])
    first_ranks = np.array(first_ranks)
    return {
        "mAP": float(np.mean(average_precisions)),
        "mINP": float(np.mean(inverse_negative_penalties)),
        "cmc": np.array([(first_ranks <= k).mean() for k in range(1, max_rank + 1)]),
        "num_valid_queries": len(first_ranks),
    }


def run_worker(function: str, sizes: dict, dim: int, seed: int) -> dict:
    """Build the inputs, then time one call of ``function``; returns the measurements."""
    from reidreg.evaluation import evaluate, rank_metrics

    generator = torch.Generator().manual_seed(seed)
    labels = build_labels(sizes, generator)
    if function == "evaluate":
        inputs = {
            "q_feats": torch.randn(sizes["num_query"], dim, generator=generator),
            "g_feats": torch.randn(sizes["num_gallery"], dim, generator=generator),
        }
        call = lambda: evaluate(**inputs, **labels)  # noqa: E731
    else:
        distmat = torch.rand(sizes["num_query"], sizes["num_gallery"], generator=generator).numpy()
        labels = {key: values.numpy() for key, values in labels.items()}
        metrics = rank_metrics if function == "rank_metrics" else sort_based_metrics
        call = lambda: metrics(distmat, **labels)  # noqa: E731
    peak_was_reset = reset_peak_memory()
    rss_before = memory_kib("VmRSS")
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    result = call()
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return {
        "function": function,
        "wall_s": wall,
        "cpu_s": cpu,
        "inputs_mib": rss_before / 1024,
        "working_memory_mib": (memory_kib("VmHWM") - rss_before) / 1024,
        "peak_is_since_start": not peak_was_reset,
        "mAP": result["mAP"],
        "R1": float(result["cmc"][0]),
        "num_valid_queries": result["num_valid_queries"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="Market-1501 sizes instead of MSMT17's")
    parser.add_argument("--num-query", type=int, help="override the number of queries")
    parser.add_argument("--num-gallery", type=int, help="override the gallery size")
    parser.add_argument("--num-ids", type=int, help="override the number of test identities")
    parser.add_argument("--num-cameras", type=int, help="override the number of cameras")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension for evaluate (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also time the sort-based evaluator")
    parser.add_argument("--only", choices=FUNCTIONS, nargs="+", help="measure only these functions")
    parser.add_argument("--worker", choices=FUNCTIONS, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()

    sizes = dict(MARKET1501 if args.small else MSMT17)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.worker:
        print(json.dumps(run_worker(args.worker, sizes, args.dim, args.seed)))
        return

    functions = args.only or [f for f in FUNCTIONS if f != "baseline" or args.baseline]
    print(
        f"problem: {sizes['num_query']} queries x {sizes['num_gallery']} gallery, {sizes['num_ids']} ids, "
        f"{sizes['num_cameras']} cameras; evaluate features {args.dim}-d; torch threads "
        f"{torch.get_num_threads()}, CPUs {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}"
    )
    size_args = [f"--{key.replace('_', '-')}={value}" for key, value in sizes.items()]
    for function in functions:
        command = [
            sys.executable,
            __file__,
            f"--worker={function}",
            f"--dim={args.dim}",
            f"--seed={args.seed}",
        ]
        output = subprocess.run(command + size_args, check=True, capture_output=True, text=True).stdout
        stats = json.loads(output.strip().splitlines()[-1])
        since_start = " (peak since process start)" if stats["peak_is_since_start"] else ""
        print(
            f"{function:>13}: wall {stats['wall_s']:7.2f} s  cpu {stats['cpu_s']:7.2f} s  "
            f"working memory {stats['working_memory_mib']:8.1f} MiB{since_start} "
            f"(RSS with inputs {stats['inputs_mib']:.0f} MiB)  mAP {stats['mAP']:.6f}  R1 {stats['R1']:.6f}  "
            f"valid queries {stats['num_valid_queries']}"
        )


if __name__ == "__main__":
    main()
