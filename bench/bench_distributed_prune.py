"""Benchmark of `slm-fast prune` as a pipeline over blocks (slm_fast/parallel/) against one process,
in the same run, on this machine.

Two launches of the same command line (`prune MODEL OUT --remove R --samples N --seq-len S
--micro-batch M`), alternated over --rounds rounds:
  - 1 process, 1 torch thread (the baseline),
  - torchrun --standalone --nproc-per-node 2, 1 thread per rank (gloo).
(1 process with 2 threads was tried as a third launch: on this shared machine, load average 7 on its 2
cores, its OpenMP threads spun for more than 2.5x the single thread's CPU seconds and the launch did
not finish in 6 minutes, so it is left out.)
Each is timed from outside (wall seconds of the command, CPU seconds of it and its children) and by
its report (timings_s: calibration and search). From the distributed report: the slices, the bytes of
hidden states each rank sent per search step (one step of best-first = one sweep), the messages, and
each rank's busy fraction over the search (1 - time waiting in receives, sends and collectives / wall).
Every launch must commit the same windows with the same similarity (checked).

Honest conditions: this machine has 2 cores shared with other people's work (the load average is
recorded at the start and end), so wall seconds are noisy; the medians and the CPU seconds are the
figures to read, and the busy fractions say how well the pipeline overlaps independently of the load.

    .venv/bin/python bench/bench_distributed_prune.py --model /work/wt/smollm2 --out bench/bench_distributed_prune.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread": (2, 1),
}


def launch(model: str, out: Path, processes: int, threads: int, args: argparse.Namespace) -> dict:
    command = ["prune", model, str(out), "--remove", str(args.remove), "--method", "slm", "--compensate", "none"]
    command += ["--samples", str(args.samples)]
    command += ["--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--no-progress", "--overwrite"]
    if processes == 1:
        argv = [sys.executable, "-m", "slm_fast", *command]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        argv += ["-m", "slm_fast", *command]
    env = {**os.environ, "SLM_FAST_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    report = json.loads((out / "slm_report.json").read_text())
    row = {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "calibrate_s": report["timings_s"]["calibrate"],
        "search_s": report["timings_s"]["search"],
        "windows": report["windows"],
        "similarity": report["similarity"],
    }
    if "distributed" in report:
        pipeline = report["distributed"]
        row["slices"] = pipeline["slices"]
        row["chunks"] = pipeline["chunks"]
        row["ranks"] = [
            {
                "rank": r["rank"],
                "blocks": r["blocks"],
                "busy_fraction": r["search"]["busy_fraction"],
                "waiting_s": r["search"]["waiting_s"],
                "calibration_busy_fraction": r["calibration"]["busy_fraction"],
                "state_bytes_per_search_step": r["traffic"]["state_bytes_per_search_pass"],
                "messages": r["traffic"]["messages"],
                "blocks_loaded": r["blocks_loaded"],
            }
            for r in pipeline["ranks"]
        ]
    return row


def summarize(rows: dict[str, list[dict]]) -> dict:
    baseline = statistics.median(r["search_s"] for r in rows["1 process x 1 thread"])
    out = {}
    for name, runs in rows.items():
        search = statistics.median(r["search_s"] for r in runs)
        entry = {
            "runs": len(runs),
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "median_calibrate_s": statistics.median(r["calibrate_s"] for r in runs),
            "median_search_s": search,
            "search_speedup_vs_baseline": baseline / search,
        }
        if "ranks" in runs[0]:
            entry["median_busy_fraction"] = [
                statistics.median(r["ranks"][k]["busy_fraction"] for r in runs) for k in range(len(runs[0]["ranks"]))
            ]
            entry["state_bytes_per_search_step"] = [r["state_bytes_per_search_step"] for r in runs[0]["ranks"]]
            entry["slices"] = runs[0]["slices"]
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="checkpoint folder (e.g. the SmolLM2 built by `slm-fast assets`)"
    )
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dprune-") as folder:
        for round_ in range(args.rounds):
            for name, (processes, threads) in CONFIGS.items():
                row = launch(args.model, Path(folder) / "out", processes, threads, args)
                rows[name].append(row)
                print(
                    f"round {round_ + 1} {name}: search {row['search_s']:.1f} s, wall {row['wall_s']:.1f} s", flush=True
                )
    decisions = {(json.dumps(r["windows"]), round(r["similarity"], 12)) for runs in rows.values() for r in runs}
    if len(decisions) != 1:
        raise SystemExit(f"the launches disagree: {decisions}")
    result = {
        "command": {k: getattr(args, k) for k in ("model", "remove", "samples", "seq_len", "micro_batch", "rounds")},
        "load_average_before_after": [load_before, os.getloadavg()],
        "cores": os.cpu_count(),
        "summary": summarize(rows),
        "runs": rows,
    }
    print(json.dumps(result["summary"], indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
