"""How a best-first prune run grows with the number of blocks and the calibration size, the cost model
checked against measurement, and what that implies for Llama-70B and -405B on one H200.

Parts (each prints a table; `--json` keeps the raw figures):

- `blocks`: synthetic Llama checkpoints (random weights, narrow blocks: hidden `--hidden`) with
  `--blocks` blocks, one best-first step (`--remove 1`), calibration `--samples` x `--seq-len`, memory
  budget a quarter of the model. Each run is a child process (its own peak RSS); its report holds the
  measured figures beside the cost model's prediction (made before the run, from rates measured then).
- `calib`: the same at one block count, growing the calibration.
- `block70b`: a few real Llama-70B-sized blocks (1.71 GB bf16; `df` is checked first, all removed
  after), pruned to 25 % of its blocks; the calibration is small because each block forward costs
  ~1.7 GFLOP per token on this CPU.
- `extrapolate`: the cost model, with no weights at all (header-only sparse checkpoints), for the
  issue's configuration (80 narrow blocks, 16 x 512 tokens, 25 % removed; rates measured here on the
  narrow checkpoint) and for real Llama-70B (80 blocks) and -405B (126 blocks) pruned to 25 % on one
  H200 (141 GB, budget 85 % of it, 256 GB pinned host memory) with a 5 GB/s disk, by SLM's best-first
  search and by SLEB's loop; the H200's rate is assumed (half its 989 TFLOP/s dense bf16 peak), not
  measured.

Every measured figure is from this run; every extrapolated one says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import torch
from harness import (
    GB,
    BlockShape,
    evict_from_page_cache,
    run_checked,
    slm_fast_command,
    write_synthetic_checkpoint,
)

from slm_fast.budget import plan_memory
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.cost import (
    Rates,
    Replay,
    flops_per_token,
    head_tokens_per_plan,
    predicted_sleb_steps,
    predicted_steps,
    predicted_sweeps,
    sharing_gain,
    summarize,
    summarize_compensation,
)
from slm_fast.windows import output_blocks

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SMOLLM2_VOCAB = 49152  # the tokenizer copied into the synthetic checkpoints
SHAPE_70B = BlockShape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256)
SHAPE_405B = BlockShape(hidden=16384, intermediate=53248, heads=128, kv_heads=8, vocab=128256)
H200 = dict(
    memory=141 * 10**9,
    budget_fraction=0.85,
    host=256 * 10**9,
    bf16_flops=989e12,
    fp64_flops=67e12,
    efficiency=0.5,
    disk=5e9,
)


def narrow_shape(hidden: int) -> BlockShape:
    return BlockShape(
        hidden=hidden,
        intermediate=hidden * 11 // 4,
        heads=max(1, hidden // 64),
        kv_heads=max(1, hidden // 64),
        vocab=SMOLLM2_VOCAB,
    )


def make_checkpoint(folder: Path, shape: BlockShape, blocks: int, dtype: torch.dtype, tokenizer_from: Path) -> Path:
    if not (folder / "config.json").exists():
        write_synthetic_checkpoint(folder, shape, blocks, dtype=dtype)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def prune_row(source: Path, workdir: Path, samples: int, seq_len: int, remove: int, budget: int, threads: int) -> dict:
    output = workdir / f"{source.name}-pruned"
    evict_from_page_cache(source)
    command = slm_fast_command(
        "--threads", str(threads), "prune", str(source), str(output), "--remove", str(remove), "--method", "slm",
        "--compensate", "none",
        "--samples", str(samples), "--seq-len", str(seq_len), "--memory-budget", str(budget),
        "--calib", "austen:emma", "--overwrite", "--no-progress",
    )  # fmt: skip
    run = run_checked(command)
    report = json.loads((output / "slm_report.json").read_text())
    shutil.rmtree(output)
    cost = report["cost"]
    measured, predicted, replayed = cost["measured"], cost["predicted"], cost["replayed"]
    steps = max(1, remove)
    return {
        "blocks": CheckpointReader(source).num_blocks,
        "model_gb": CheckpointReader(source).total_nbytes / GB,
        "tokens": samples * seq_len,
        "budget_gb": budget / GB,
        "block_loads": measured["block_loads"],
        "bytes_read_gb": measured["bytes_read"] / GB,
        "plan_state_gb": replayed["max_plan_state_bytes"] / GB,
        "spilled_gb": measured["state_bytes_written"] / GB,
        "peak_rss_gb": run.peak_rss_bytes / GB,
        "calibrate_s": report["timings_s"]["calibrate"],
        "search_s_per_step": report["timings_s"]["search"] / steps,
        "measured_s": measured["seconds"],
        "predicted_s": predicted["seconds"],
        "predicted_over_measured": cost["predicted_over_measured"],
        "windows": report["windows"],
        "micro_batch": report["memory"]["micro_batch"],
    }


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        "| blocks | model GB | calib tokens | budget GB | block loads | read GB | plan states GB | spilled GB "
        "| peak RSS GB | s / step | predicted / measured s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['blocks']} | {r['model_gb']:.2f} | {r['tokens']} | {r['budget_gb']:.3f} | {r['block_loads']} "
            f"| {r['bytes_read_gb']:.2f} | {r['plan_state_gb']:.3f} | {r['spilled_gb']:.2f} | {r['peak_rss_gb']:.2f} "
            f"| {r['search_s_per_step']:.1f} | {r['predicted_s']:.1f} / {r['measured_s']:.1f} "
            f"({r['predicted_over_measured']['seconds']:.2f}) |"
        )


def bench_blocks(args, workdir: Path) -> list[dict]:
    rows = []
    for blocks in args.blocks:
        source = make_checkpoint(
            workdir / f"narrow{args.hidden}-{blocks}", narrow_shape(args.hidden), blocks, torch.float32, args.smollm2
        )
        budget = CheckpointReader(source).total_nbytes // 4
        rows.append(prune_row(source, workdir, args.samples, args.seq_len, 1, budget, args.threads))
        print(rows[-1], flush=True)
    print_rows(
        f"growth with blocks: hidden {args.hidden}, one best-first step, calibration {args.samples} x {args.seq_len}",
        rows,
    )
    return rows


def bench_calib(args, workdir: Path) -> list[dict]:
    rows = []
    source = make_checkpoint(
        workdir / f"narrow{args.hidden}-{args.calib_blocks}",
        narrow_shape(args.hidden),
        args.calib_blocks,
        torch.float32,
        args.smollm2,
    )
    budget = CheckpointReader(source).total_nbytes // 4
    for samples, seq_len in args.calib:
        rows.append(prune_row(source, workdir, samples, seq_len, 1, budget, args.threads))
        print(rows[-1], flush=True)
    print_rows(f"growth with calibration: {args.calib_blocks} blocks of hidden {args.hidden}, one step", rows)
    return rows


def bench_block70b(args, workdir: Path) -> list[dict]:
    block_bytes = sum(math.prod(s) for s in SHAPE_70B.block_tensors().values()) * 2
    shape = BlockShape(
        SHAPE_70B.hidden, SHAPE_70B.intermediate, SHAPE_70B.heads, SHAPE_70B.kv_heads, vocab=SMOLLM2_VOCAB
    )
    model_bytes = args.blocks70b * block_bytes + 2 * SMOLLM2_VOCAB * shape.hidden * 2
    needed = model_bytes * 2 + 10**9  # the source and the pruned output
    free = shutil.disk_usage(workdir).free
    print(f"df {workdir}: {free / GB:.1f} GB free, this part needs {needed / GB:.1f} GB")
    if free < needed:
        raise SystemExit("not enough free disk for the 70B-sized part")
    source = make_checkpoint(
        workdir / f"blocks70b-{args.blocks70b}", shape, args.blocks70b, torch.bfloat16, args.smollm2
    )
    try:
        budget = int(model_bytes * 0.75)  # under the model: two blocks and the shell fit, not all blocks
        rows = [
            prune_row(
                source, workdir, args.samples70b, args.seq_len70b, max(1, args.blocks70b // 4), budget, args.threads
            )
        ]
    finally:
        shutil.rmtree(source)
    print(rows[-1])
    print_rows(
        f"Llama-70B-sized blocks ({block_bytes / GB:.2f} GB bf16), 25 % removed, "
        f"calibration {args.samples70b} x {args.seq_len70b}",
        rows,
    )
    return rows


def header_only_checkpoint(folder: Path, shape: BlockShape, blocks: int, dtype: str = "BF16") -> Path:
    """A checkpoint whose safetensors header is real and whose data is a hole (a sparse file): enough
    for the cost model, which reads shapes and sizes only, at no disk cost."""
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    tensors = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for block in range(blocks):
        tensors |= {f"model.layers.{block}.{name}": size for name, size in shape.block_tensors().items()}
    tensors |= {"model.norm.weight": (shape.hidden,), "lm_head.weight": (shape.vocab, shape.hidden)}
    header, offset = {}, 0
    for name, size in tensors.items():
        nbytes = math.prod(size) * itemsize
        header[name] = {"dtype": dtype, "shape": list(size), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    config = shape.config(blocks, "bfloat16" if dtype == "BF16" else "float32")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def extrapolate_row(
    name: str, reader: CheckpointReader, samples: int, seq_len: int, dtype, device, budget, rates: Rates, host=None,
    method: str = "slm",
) -> dict:  # fmt: skip
    """The cost model's figures for removing a quarter of the blocks: SLM's best-first search (windows
    grown top-down) or SLEB's loop (blocks removed top-down; every plan's tokens through the head)."""
    target = reader.num_blocks // 4
    layout = plan_memory(reader, samples, seq_len, dtype, torch.device(device), budget, host_bytes=host)
    head_tokens = head_tokens_per_plan("ppl" if method == "sleb" else "cosine", samples, seq_len)
    replay = Replay(reader, layout, samples, seq_len, dtype, "keep_high", head_tokens)
    if method == "sleb":
        steps = list(predicted_sleb_steps(reader.num_blocks, target))
        selection = output_blocks([], reader.num_blocks, steps[-1][1])
    else:
        steps = list(predicted_steps(reader.num_blocks, target, 0, reader.num_blocks - 2))
        selection = output_blocks(steps[-1][1], reader.num_blocks)
    for plans, _ in steps:
        replay.sweep(plans)
    compensation = replay.compensation(selection)
    figures = summarize(replay.finish(), rates, reader, seq_len, dtype)
    return {
        "compensation": summarize_compensation(compensation, rates),
        "model": name,
        "method": method,
        "blocks": reader.num_blocks,
        "remove": target,
        "tokens": f"{samples} x {seq_len}",
        "budget_gb": budget / GB,
        "layout": layout.to_json(),
        **figures,
    }


def h200_rates(reader: CheckpointReader, seq_len: int) -> Rates:
    config = reader.config
    params = sum(math.prod(reader.entry(reader.full_name(0, n)).shape) for n in reader.block_tensor_names(0))
    per_token = flops_per_token(config, seq_len, params)
    flops = H200["bf16_flops"] * H200["efficiency"]
    return Rates(
        read_bytes_per_s=H200["disk"],
        token_forwards_per_s=flops / per_token,
        disk_write_bytes_per_s=H200["disk"],
        disk_read_bytes_per_s=H200["disk"],
        sums_flops_per_s=H200["fp64_flops"] * H200["efficiency"],
    )


def bench_extrapolate(args, workdir: Path) -> list[dict]:
    from slm_fast.cost import measure_rates
    from slm_fast.runtime.stream import BlockRunner

    rows = []
    narrow = make_checkpoint(
        workdir / f"narrow{args.hidden}-80", narrow_shape(args.hidden), 80, torch.float32, args.smollm2
    )
    reader = CheckpointReader(narrow)
    budget = reader.total_nbytes // 4
    layout = plan_memory(reader, 16, 512, torch.float32, torch.device("cpu"), budget)
    runner = BlockRunner(reader, micro_batch=layout.micro_batch)
    rates = measure_rates(reader, runner, layout, 512, workdir)
    runner.close()
    cpu_sums_rate = rates.sums_flops_per_s  # float64 M^T M on this CPU, for the sums' cost off the GPU
    rows.append(
        extrapolate_row(
            f"narrow {args.hidden} (this CPU, rates measured)", reader, 16, 512, torch.float32, "cpu", budget, rates
        )
    )
    budget_h200 = int(H200["memory"] * H200["budget_fraction"])
    for name, shape, blocks in (("Llama-70B", SHAPE_70B, 80), ("Llama-405B", SHAPE_405B, 126)):
        folder = header_only_checkpoint(workdir / f"header-{name}", shape, blocks)
        reader = CheckpointReader(folder)
        for method in ("slm", "sleb"):
            for samples, seq_len in ((16, 512), (128, 2048)):
                rates = h200_rates(reader, seq_len)
                rows.append(
                    extrapolate_row(
                        f"{name} (H200, assumed rates)",
                        reader,
                        samples,
                        seq_len,
                        torch.bfloat16,
                        "cuda",
                        budget_h200,
                        rates,
                        host=H200["host"],
                        method=method,
                    )
                )
                row = rows[-1]
                print(row["model"], method, row["tokens"], f"{row['seconds'] / 3600:.1f} h", flush=True)
        shutil.rmtree(folder)
    for row in rows:
        row["compensation"]["sums_seconds_on_this_cpu"] = row["compensation"]["sums_flops"] / cpu_sums_rate
    print("\nextrapolated (cost model), 25 % of the blocks removed by best-first (slm) or SLEB's loop (sleb)")
    print(
        "| model | search | calib tokens | block loads | read GB | plan states GB | spilled GB "
        "| peak device / host / disk states GB | PFLOP (blocks + head) | read h | compute h | head h | spill h "
        "| total h | compensation: spans, h (of which sums) | the sums on this CPU h |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak, parts, comp = r["peak_state_bytes"], r["seconds_by_part"], r["compensation"]
        print(
            f"| {r['model']} | {r['method']} | {r['tokens']} | {r['block_loads']:,} | {r['bytes_read'] / GB:,.0f} "
            f"| {r['max_plan_state_bytes'] / GB:,.1f} | {r['state_bytes_written'] / GB:,.0f} "
            f"| {peak['device'] / GB:,.1f} / {peak['host'] / GB:,.1f} / {peak['disk'] / GB:,.1f} "
            f"| {(r['forward_flops'] + r['head_flops']) / 1e15:,.1f} | {parts['read'] / 3600:.2f} "
            f"| {parts['compute'] / 3600:.2f} | {parts['head'] / 3600:.2f} "
            f"| {parts['state_disk'] / 3600:.2f} | {r['seconds'] / 3600:.2f} "
            f"| {comp['carriers']}, {comp['seconds'] / 3600:.3f} ({comp['seconds_by_part']['sums'] / 3600:.3f}) "
            f"| {comp['sums_seconds_on_this_cpu'] / 3600:.2f} |"
        )
    return rows


def bench_sharing(args, workdir: Path) -> list[dict]:
    """Block runs of a 25 % best-first search with and without shared states (plans with one history
    computed once), for windows placed top-down (the cost model's assumption), bottom-up and at random:
    exact counts from the search's own schedule (the sweep runs exactly these; tests check the runner's
    counter against them)."""
    rows = []
    for blocks in (30, 80, 126):
        for placement in ("top", "bottom", "random"):
            sweeps = predicted_sweeps(blocks, blocks // 4, 0, blocks - 2, placement, seed=1)
            alone, shared = sharing_gain(sweeps, blocks)
            rows.append({"blocks": blocks, "placement": placement, "alone": alone, "shared": shared})
    print("\nblock runs of a 25 % best-first search: each plan alone vs shared histories")
    print("| blocks | windows placed | block runs, plans alone | block runs, shared | gain |")
    print("|---|---|---|---|---|")
    for r in rows:
        gain = r["alone"] / r["shared"]
        print(f"| {r['blocks']} | {r['placement']} | {r['alone']:,} | {r['shared']:,} | {gain:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("blocks", "calib", "block70b", "extrapolate", "sharing", "all"), default="all"
    )
    parser.add_argument("--smollm2", type=Path, default=Path("runs/smollm2"), help="SmolLM2 folder (its tokenizer)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-blocks", type=int, default=20)
    parser.add_argument(
        "--calib", type=lambda t: tuple(map(int, t.split("x"))), nargs="+", default=[(4, 512), (8, 512), (16, 512)]
    )
    parser.add_argument("--blocks70b", type=int, default=4)
    parser.add_argument("--samples70b", type=int, default=2)
    parser.add_argument("--seq-len70b", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_bench_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    parts = ("blocks", "calib", "block70b", "extrapolate", "sharing") if args.part == "all" else (args.part,)
    try:
        for part in parts:
            results[part] = {
                "blocks": bench_blocks,
                "calib": bench_calib,
                "block70b": bench_block70b,
                "extrapolate": bench_extrapolate,
                "sharing": bench_sharing,
            }[part](args, args.workdir)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
