"""`slm-fast heatmap` and `slm-fast evaluate --ppl` on SmolLM2: one process against `torchrun
--nproc-per-node 2` (gloo) on this machine, in the same run, alternating --rounds times.

Each launch is a child process tree; reported per command: median wall seconds, median CPU seconds of
the whole tree (every rank, and torchrun's launcher), the seconds the command itself reports on rank 0
("own": heatmap from opening the model to the matrix, evaluate from its argument checks to the report;
neither counts interpreter start and imports), the ratio one process /
two processes of the wall time, and whether the outputs agree (heatmap: the largest CKA difference; evaluate: perplexity
equal bit for bit). Every process runs one torch thread. The machine has 2 cores shared with other
work: the wall ratio is what 2 processes gain here at best; the load average is printed with it.

    .venv/bin/python bench/bench_distributed_commands.py /work/wt/smollm2 --rounds 2 --out /tmp/dist_cmds.json
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
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(command: list[str], processes: int) -> tuple[float, float]:
    """(wall s, CPU s of the child tree) of `slm-fast COMMAND` on `processes` processes."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "SLM_FAST_THREADS": "1", "PYTHONPATH": str(ROOT)}
    prefix = [sys.executable, "-m"]
    if processes > 1:
        prefix += ["torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = time.perf_counter()
    run = subprocess.run([*prefix, "slm_fast", *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} on {processes} processes failed:\n{run.stdout}\n{run.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="SmolLM2 checkpoint folder (slm-fast assets smollm2 DEST)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="heatmap calibration samples")
    parser.add_argument("--seq-len", type=int, default=256, help="heatmap tokens per sample")
    parser.add_argument("--windows", type=int, default=8, help="evaluate: perplexity windows of 512 tokens")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def heatmap(name: str) -> list[str]:
            return ["heatmap", str(args.model), "--out", str(folder / f"{name}.png"), "--samples", str(args.samples),
                    "--seq-len", str(args.seq_len), "--no-progress"]  # fmt: skip

        def evaluate(name: str) -> list[str]:
            return ["evaluate", str(args.model), "--ppl", "austen:pride_and_prejudice", "--seq-len", "512",
                    "--max-windows", str(args.windows), "--json", str(folder / f"{name}.json"),
                    "--no-progress"]  # fmt: skip

        for label, command in (("heatmap", heatmap), ("evaluate --ppl", evaluate)):
            times: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
            for _ in range(args.rounds):
                for processes in (1, 2):
                    wall, cpu = launch(command(f"{label[:4]}{processes}"), processes)
                    record = json.loads((folder / f"{label[:4]}{processes}.json").read_text())
                    own = record["seconds"] if label == "heatmap" else record["run"]["seconds"]
                    times[processes].append((wall, cpu, own))
            one, two = (json.loads((folder / f"{label[:4]}{p}.json").read_text()) for p in (1, 2))
            if label == "heatmap":
                pairs = zip(chain.from_iterable(one["cka"]), chain.from_iterable(two["cka"]), strict=True)
                agree = max(abs(a - b) for a, b in pairs)
            else:
                agree = one["perplexity"] == two["perplexity"]
            row = {
                "command": label,
                "wall_s": {p: statistics.median(t[0] for t in times[p]) for p in (1, 2)},
                "cpu_s": {p: statistics.median(t[1] for t in times[p]) for p in (1, 2)},
                "command_s": {p: statistics.median(t[2] for t in times[p]) for p in (1, 2)},
                "agreement": agree,
                "load_average": os.getloadavg()[0],
            }
            row["wall_ratio"] = row["wall_s"][1] / row["wall_s"][2]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nSmolLM2, 1 vs 2 gloo processes, one thread each, {args.rounds} rounds (medians)")
    print("| command | wall s 1 / 2 processes | ratio | own s 1 / 2 | CPU s 1 / 2 (all ranks) | agreement | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['command']} | {row['wall_s'][1]:.1f} / {row['wall_s'][2]:.1f} | {row['wall_ratio']:.2f}x | "
            f"{row['command_s'][1]:.1f} / {row['command_s'][2]:.1f} | {row['cpu_s'][1]:.1f} / {row['cpu_s'][2]:.1f} | "
            f"{row['agreement']} | {row['load_average']:.1f} |"
        )


if __name__ == "__main__":
    main()
