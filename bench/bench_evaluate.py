"""Harness tasks through the block-streamed model, against lm-evaluation-harness's own `hf` model.

--part smollm2: the seven tasks of the layer-pruning papers on the first --limit documents each,
  `slm-fast evaluate --tasks all` (requests sharing a context run as prefix trees, the default),
  the same with `--no-shared-prefixes` (one row per distinct input) and `lm_eval --model hf` (the same
  local task configs, float32, CPU, one thread each, run one after the other in this run): wall
  time, tokens run, peak RSS, and every task's acc / acc_norm compared.
--part scale: synthetic Llama checkpoints (random bf16 weights) of 4 and 16 blocks, many times larger
  than the --memory-budget given to `slm-fast evaluate`, scored on the seven tasks: block loads and
  peak RSS against the checkpoint's size (flat RSS as the model grows is the point). This machine has
  23 GB of memory; a checkpoint larger than that is more disk than it can spare, so "larger than
  memory" is shown against the budget instead.

    python bench/bench_evaluate.py --part smollm2 --model /work/wt/smollm2 --limit 100
    python bench/bench_evaluate.py --part scale --workdir /tmp/bench_eval --limit 10 --blocks 4 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import (
    GB,
    BlockShape,
    evict_from_page_cache,
    run_checked,
    slm_fast_command,
    write_synthetic_checkpoint,
)

from slm_fast.evaluation.local_tasks import LOCAL_TASKS, write_local_configs

SYNTHETIC = BlockShape(hidden=2048, intermediate=8192, heads=16, kv_heads=16, vocab=49152)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
THREADS = {"OMP_NUM_THREADS": "1", "SLM_FAST_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ours(model: Path, limit: int, out: Path, *extra: str) -> tuple[dict, float, int]:
    command = slm_fast_command(
        "--threads", "1", "evaluate", str(model), "--tasks", "all", "--limit", str(limit), "--json", str(out),
        "--no-progress", *extra,
    )  # fmt: skip
    run = run_checked(command, env=THREADS)
    return json.loads(out.read_text()), run.seconds, run.peak_rss_bytes


def harness_hf(model: Path, limit: int, workdir: Path) -> tuple[dict, float, int]:
    configs = write_local_configs(workdir / "local_tasks")
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
        "--tasks", ",".join(LOCAL_TASKS), "--include_path", str(configs), "--limit", str(limit),
        "--batch_size", "16", "--output_path", str(workdir / "hf"),
    ]  # fmt: skip
    run = run_checked(command, env=THREADS)
    (result,) = (workdir / "hf").rglob("results_*.json")
    return json.loads(result.read_text()), run.seconds, run.peak_rss_bytes


def bench_smollm2(model: Path, limit: int, workdir: Path) -> dict:
    mine, my_seconds, my_rss = ours(model, limit, workdir / "ours.json")
    rowwise, rowwise_seconds, rowwise_rss = ours(model, limit, workdir / "rowwise.json", "--no-shared-prefixes")
    theirs, hf_seconds, hf_rss = harness_hf(model, limit, workdir)
    rows = []
    for task in LOCAL_TASKS:
        got, alone = mine["zero_shot"]["tasks"][task], rowwise["zero_shot"]["tasks"][task]
        expected = theirs["results"][task]
        row = {"task": task}
        for metric, name in (("acc", ""), ("acc_norm", "_norm")):
            row |= {f"ours{name}": got.get(metric), f"rowwise{name}": alone.get(metric)}
            row[f"hf{name}"] = expected.get(f"{metric},none")
        rows.append(row)
    equal = all(
        r["ours"] == r["rowwise"] == r["hf"] and r["ours_norm"] == r["rowwise_norm"] == r["hf_norm"] for r in rows
    )
    print(f"\nSmolLM2-135M, seven tasks x first {limit} documents, float32, 1 thread")
    print(f"{'task':<14} {'acc ours':>8} {'rowwise':>8} {'acc hf':>8} {'norm ours':>9} {'rowwise':>8} {'norm hf':>8}")
    for r in rows:
        norm = [f"{v:.4f}" if v is not None else "-" for v in (r["ours_norm"], r["rowwise_norm"], r["hf_norm"])]
        print(
            f"{r['task']:<14} {r['ours']:>8.4f} {r['rowwise']:>8.4f} {r['hf']:>8.4f} "
            f"{norm[0]:>9} {norm[1]:>8} {norm[2]:>8}"
        )
    print(f"all acc / acc_norm identical: {equal}")
    for name, result, seconds, rss in (
        ("slm-fast evaluate", mine, my_seconds, my_rss),
        ("  --no-shared-prefixes", rowwise, rowwise_seconds, rowwise_rss),
    ):
        run = result["run"]
        print(
            f"{name}: {seconds:.1f} s, {run['tokens']} tokens run, peak RSS {rss / GB:.2f} GB, "
            f"{run['block_loads']} block loads"
        )
    print(f"lm_eval --model hf: {hf_seconds:.1f} s, peak RSS {hf_rss / GB:.2f} GB")
    print(
        f"speed ratios: row by row / shared prefixes {rowwise_seconds / my_seconds:.2f}x, "
        f"hf / shared prefixes {hf_seconds / my_seconds:.2f}x"
    )
    return {
        "limit": limit,
        "rows": rows,
        "identical": equal,
        "ours": {"seconds": my_seconds, "peak_rss_bytes": my_rss, "run": mine["run"]},
        "rowwise": {"seconds": rowwise_seconds, "peak_rss_bytes": rowwise_rss, "run": rowwise["run"]},
        "hf": {"seconds": hf_seconds, "peak_rss_bytes": hf_rss},
    }


def bench_scale(limit: int, workdir: Path, tokenizer_from: Path, block_counts: list[int], budget: str) -> dict:
    rows = []
    for blocks in block_counts:
        source = workdir / f"synthetic-{blocks}"
        if not (source / "config.json").exists():
            write_synthetic_checkpoint(source, SYNTHETIC, blocks)
            for name in TOKENIZER_FILES:
                shutil.copy(tokenizer_from / name, source / name)
        size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        evict_from_page_cache(source)
        result, seconds, rss = ours(source, limit, workdir / "scale.json", "--memory-budget", budget, "--dtype", "bf16")
        rows.append(
            {"blocks": blocks, "size_bytes": size, "seconds": seconds, "peak_rss_bytes": rss, "run": result["run"]}
        )
    print(f"\nsynthetic Llama (hidden 2048, 134 MB bf16 blocks), seven tasks x first {limit} documents,")
    print(f"--memory-budget {budget} (half for resident blocks: none fits; half for hidden states), 1 thread")
    header = ("blocks", "size GB", "time s", "requests", "rows", "block loads", "peak RSS GB")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (6, 7, 7, 8, 5, 11, 11), strict=True)))
    for row in rows:
        run = row["run"]
        print(
            f"{row['blocks']:>6} {row['size_bytes'] / GB:>7.2f} {row['seconds']:>7.1f} {run['requests']:>8} "
            f"{run['rows']:>5} {run['block_loads']:>11} {row['peak_rss_bytes'] / GB:>11.2f}"
        )
    return {"budget": budget, "limit": limit, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["smollm2", "scale"], required=True)
    parser.add_argument("--model", type=Path, default=Path("/work/wt/smollm2"), help="SmolLM2 checkpoint")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16], help="synthetic models' blocks (134 MB each)")
    parser.add_argument("--memory-budget", default="200MB", help="for --part scale")
    parser.add_argument("--json", type=Path, default=None, help="JSON file the part's figures are merged into")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.part == "smollm2":
        result = bench_smollm2(args.model, args.limit, workdir)
    else:
        result = bench_scale(args.limit, workdir, args.model, args.blocks, args.memory_budget)
    if args.json:
        recorded = json.loads(args.json.read_text()) if args.json.exists() else {}
        key = "smollm2" if args.part == "smollm2" else f"scale_budget_{args.memory_budget}"
        args.json.write_text(json.dumps(recorded | {key: result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
