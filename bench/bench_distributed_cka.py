"""Benchmark of token-parallel CKA (slm_fast/similarity/distributed.py): 1 process against 2 gloo
processes on this machine, in the same run, and the bytes each rank sends.

For each kernel (linear, rbf; all pairs, biased, explicit sigma for rbf so that only the pairing is
timed) the script alternates launches of
  - 1 process: plain cka_matrix over all n tokens (the baseline), and
  - W processes (--world, default 2) on a file:// rendezvous in a temporary folder: each rank holds an
    even shard of the same tokens and calls cka_matrix(..., process_group=WORLD),
--rounds times (default 2), each launch timing --repeats calls after one warm-up call. Every process runs
one torch thread. A distributed call's time is the slowest rank's (ranks start together after a
barrier). Reported: medians of wall and CPU seconds, the ratio baseline / distributed, the bytes each
rank sent (token shards, returned column sums, collectives; counted by distributed.Traffic), and that
the distributed CKA equals the baseline's (largest absolute difference).

The machine has 2 cores shared with other work: the wall-time ratio is what 2 processes gain here, at
best the ideal of 2x minus communication; the CPU seconds show the work each rank did.

    .venv/bin/python bench/bench_distributed_cka.py --tokens 4096 --layers 8 --width 576 --out /tmp/dist.json
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

KERNELS = ("linear", "rbf")


def make_layers(n: int, layers: int, width: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(n, 16, generator=generator)
    return [
        torch.tanh(latent @ torch.randn(16, width, generator=generator))
        + 0.5 * torch.randn(n, width, generator=generator)
        for _ in range(layers)
    ]


def rank_main(args: argparse.Namespace) -> None:
    """One process of a launch: time --repeats calls, write {times, cpu, traffic, cka} to args.result."""
    import torch
    import torch.distributed as dist

    from slm_fast import cka_matrix
    from slm_fast.similarity import distributed

    torch.set_num_threads(1)
    options = {"kernel": args.kernel, "sigma": 10.0 if args.kernel == "rbf" else None}
    layers = make_layers(args.tokens, args.layers, args.width)
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world)
        bounds = [args.tokens * r // args.world for r in range(args.world + 1)]
        layers = [x[bounds[args.rank] : bounds[args.rank + 1]].clone() for x in layers]
    times, cpu, traffic, cka = [], [], None, None
    for repeat in range(args.repeats + 1):
        if args.world > 1:
            dist.barrier()
            traffic = distributed.Traffic()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if args.world > 1:
            cka = distributed.matrices(
                layers,
                dist.group.WORLD,
                **options,
                unbiased=False,
                backend="auto",
                pairs=None,
                sigma_scale=1.0,
                median_diagonal=False,
                median_pairs=65536,
                seed=0,
                block_size=None,
                traffic=traffic,
            )[0]
        else:
            cka = cka_matrix(layers, **options)
        if repeat:  # the first call is a warm-up
            times.append(time.perf_counter() - wall0)
            cpu.append(time.process_time() - cpu0)
    if args.world > 1:
        dist.destroy_process_group()
    result = {"times": times, "cpu": cpu, "cka": cka.tolist(), "traffic": traffic and vars(traffic)}
    Path(args.result).write_text(json.dumps(result))
    if args.world > 1:
        # skip interpreter finalization, where gloo's threads can abort the process (see the test worker)
        sys.stdout.flush()
        os._exit(0)


def launch(args: argparse.Namespace, kernel: str, world: int, folder: Path) -> list[dict]:
    script = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent.parent)}
    init = folder / f"init-{kernel}-{world}-{time.monotonic_ns()}"
    common = [f"--tokens={args.tokens}", f"--layers={args.layers}", f"--width={args.width}"]
    common += [f"--repeats={args.repeats}", f"--kernel={kernel}", f"--world={world}", f"--init={init}"]
    procs, results = [], []
    for rank in range(world):
        result = folder / f"{kernel}-{world}-{rank}.json"
        cmd = [sys.executable, str(script), "--rank-main", f"--rank={rank}", f"--result={result}", *common]
        procs.append((subprocess.Popen(cmd, env=env), result))
    for proc, result in procs:
        if proc.wait(timeout=args.timeout) != 0:
            raise SystemExit(f"a rank of the {world}-process {kernel} launch failed")
        results.append(json.loads(result.read_text()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default="rbf", help=argparse.SUPPRESS)
    parser.add_argument("--init", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in KERNELS:
            base_wall, base_cpu, dist_wall, dist_cpu = [], [], [], []
            base_cka = dist_results = None
            for _ in range(args.rounds):
                (base,) = launch(args, kernel, 1, Path(tmp))
                base_wall += base["times"]
                base_cpu += base["cpu"]
                base_cka = torch.tensor(base["cka"])
                dist_results = launch(args, kernel, args.world, Path(tmp))
                dist_wall += [max(t) for t in zip(*(r["times"] for r in dist_results), strict=True)]
                dist_cpu += [max(t) for t in zip(*(r["cpu"] for r in dist_results), strict=True)]
            difference = max(float((torch.tensor(r["cka"]) - base_cka).abs().max()) for r in dist_results)
            row = {
                "kernel": kernel,
                "tokens": args.tokens,
                "layers": args.layers,
                "width": args.width,
                "world": args.world,
                "baseline_wall_s": statistics.median(base_wall),
                "baseline_cpu_s": statistics.median(base_cpu),
                "distributed_wall_s": statistics.median(dist_wall),
                "distributed_cpu_s_slowest_rank": statistics.median(dist_cpu),
                "speedup_wall": statistics.median(base_wall) / statistics.median(dist_wall),
                "bytes_sent_per_rank": [r["traffic"] for r in dist_results],
                "max_abs_cka_difference": difference,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(f"\n1 vs {args.world} processes, n = {args.tokens}, L = {args.layers}, d = {args.width}, one thread each")
    print(
        "| kernel | 1 process (s) | distributed (s) | ratio | MB sent per rank (tokens + column sums + collectives) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        sent = ", ".join(
            f"{t['tokens'] / 1e6:.1f} + {t['column_sums'] / 1e6:.2f} + {t['collectives'] / 1e6:.3f}"
            for t in row["bytes_sent_per_rank"]
        )
        print(
            f"| {row['kernel']} | {row['baseline_wall_s']:.2f} | {row['distributed_wall_s']:.2f} | "
            f"{row['speedup_wall']:.2f}x | {sent} |"
        )


if __name__ == "__main__":
    main()
