"""`slm-fast prune` benchmarks.

Part `smollm2`: the real SmolLM2-135M on this CPU with `--preset reference` at a fixed threshold,
against the whole-model reimplementation of the reference loop from the tests (a deepcopy of the
model per candidate, one sample per forward pass, as SLM.py runs), on the same calibration tokens.
Both run as child processes; wall time and peak RSS come from the OS; the committed windows must be
identical. Ours runs twice: with the model resident (default budget) and streamed (a budget of a
few blocks).

Part `scale`: synthetic checkpoints with Llama-70B-sized blocks (hidden 8192, intermediate 28672,
64/8 heads, bf16: 1.71 GB per block) at two block counts, pruned end to end on the CPU with a memory
budget of about two blocks. Reports time per block, bytes read and written per second against this
machine's disk throughput measured in the same run, and peak RSS, which must stay flat as the block
count grows. The calibration is reduced (2 x 64 tokens) because each 70B block costs ~0.2 TFLOP per
128 tokens on this CPU; the IO and memory behaviour do not depend on it.

    python bench/bench_prune.py --part smollm2 --smollm2 /tmp/smollm2
    python bench/bench_prune.py --part scale --blocks 4 8 --workdir /tmp/slm_fast_bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from harness import (
    GB,
    BlockShape,
    disk_throughput,
    evict_from_page_cache,
    run_checked,
    slm_fast_command,
    write_synthetic_checkpoint,
)

TESTS = Path(__file__).resolve().parent.parent / "tests"
SHAPE_70B = BlockShape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=49152)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

REFERENCE_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from reference_slm import reference_slm
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
ids = torch.tensor(json.load(open({report!r}))["calibration"]["token_ids"])
model = AutoModelForCausalLM.from_pretrained({model!r}).eval()
print(json.dumps(reference_slm(model, ids, {threshold!r})))
"""


def bench_smollm2(model: Path, workdir: Path, threshold: float) -> dict:
    rows = {}
    for label, budget in (("ours, model resident", "8GB"), ("ours, streamed (budget 60MB)", "60MB")):
        output = workdir / "smollm2-pruned"
        command = slm_fast_command(
            "--threads", "1", "prune", str(model), str(output), "--preset", "reference",
            "--threshold", str(threshold), "--memory-budget", budget, "--overwrite", "--no-progress",
        )  # fmt: skip
        run = run_checked(command)
        report = json.loads((output / "slm_report.json").read_text())
        rows[label] = {
            "seconds": run.seconds,
            "peak_rss_gb": run.peak_rss_bytes / GB,
            "windows": report["windows"],
            "forward_passes": report["forward_passes"],
            "blocks_loaded": report["blocks_loaded"],
        }
        shutil.copy(output / "slm_report.json", workdir / "smollm2-report.json")
    script = REFERENCE_CHILD.format(
        tests=str(TESTS), report=str(workdir / "smollm2-report.json"), model=str(model), threshold=threshold
    )
    run = run_checked([sys.executable, "-c", script])
    windows = json.loads(run.output.strip().splitlines()[-1])
    rows["reference reimplementation (whole model, deepcopy)"] = {
        "seconds": run.seconds,
        "peak_rss_gb": run.peak_rss_bytes / GB,
        "windows": sorted(windows),
    }
    reference = rows["reference reimplementation (whole model, deepcopy)"]
    print(f"\nSmolLM2-135M, --preset reference --threshold {threshold}, 1 thread")
    print(f"{'run':<52} {'time s':>7} {'peak RSS GB':>11} {'speed-up':>8} {'RSS ratio':>9}  windows")
    for label, row in rows.items():
        speedup = reference["seconds"] / row["seconds"]
        ratio = row["peak_rss_gb"] / reference["peak_rss_gb"]
        print(
            f"{label:<52} {row['seconds']:>7.1f} {row['peak_rss_gb']:>11.2f} {speedup:>7.1f}x {ratio:>9.2f}  "
            f"{row['windows']}"
        )
    decisions = {json.dumps(sorted(row["windows"])) for row in rows.values()}
    if len(decisions) != 1:
        raise SystemExit(f"decisions differ: {decisions}")
    return rows


def bench_scale(block_counts: list[int], workdir: Path, tokenizer_from: Path, remove: int) -> dict:
    disk = disk_throughput(workdir)
    print(f"disk: write {disk['write_gb_s']:.2f} GB/s (fsync), cold read {disk['read_gb_s']:.2f} GB/s")
    block_gb = sum(_numel(s) for s in SHAPE_70B.block_tensors().values()) * 2 / GB
    budget = f"{int(2.2 * block_gb * 1000)}MB"  # two blocks (plus a little for the shell and caches)
    rows = []
    for blocks in block_counts:
        source = workdir / f"synthetic70b-{blocks}"
        if not (source / "config.json").exists():
            size = write_synthetic_checkpoint(source, SHAPE_70B, blocks)
            for name in TOKENIZER_FILES:
                shutil.copy(tokenizer_from / name, source / name)
            print(f"built {source}: {size / GB:.1f} GB")
        output = workdir / f"synthetic70b-{blocks}-pruned"
        evict_from_page_cache(source)
        command = slm_fast_command(
            "--threads", "2", "prune", str(source), str(output), "--remove", str(remove), "--method", "slm",
            "--compensate", "none",
            "--samples", "2", "--seq-len", "64", "--memory-budget", budget, "--dtype", "bf16",
            "--overwrite", "--no-progress",
        )  # fmt: skip
        run = run_checked(command)
        report = json.loads((output / "slm_report.json").read_text())
        read = report["blocks_loaded"] * block_gb * GB
        written = sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors")
        rows.append(
            {
                "blocks": blocks,
                "seconds": run.seconds,
                "seconds_per_block_loaded": run.seconds / report["blocks_loaded"],
                "blocks_loaded": report["blocks_loaded"],
                "windows": report["windows"],
                "read_gb_s": read / GB / run.seconds,
                "write_gb_s": written / GB / report["timings_s"]["write"],
                "timings_s": report["timings_s"],
                "peak_rss_gb": run.peak_rss_bytes / GB,
                "budget": budget,
            }
        )
        shutil.rmtree(output)
    print(f"\nLlama-70B-sized blocks ({block_gb:.2f} GB bf16), memory budget {budget}, 2 threads")
    print(
        f"{'blocks':>6} {'time s':>7} {'loads':>5} {'s/load':>6} {'read GB/s':>9} {'write GB/s':>10} "
        f"{'peak RSS GB':>11}  windows"
    )
    for row in rows:
        print(
            f"{row['blocks']:>6} {row['seconds']:>7.1f} {row['blocks_loaded']:>5} "
            f"{row['seconds_per_block_loaded']:>6.1f} {row['read_gb_s']:>9.2f} {row['write_gb_s']:>10.2f} "
            f"{row['peak_rss_gb']:>11.2f}  {row['windows']}"
        )
    return {"disk": disk, "block_gb": block_gb, "rows": rows}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("smollm2", "scale", "all"), default="all")
    parser.add_argument("--smollm2", type=Path, default=Path("runs/smollm2"), help="SmolLM2 checkpoint folder")
    parser.add_argument("--threshold", type=float, default=0.72, help="SLM threshold of the SmolLM2 part")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8], help="block counts of the scale part")
    parser.add_argument("--scale-remove", type=int, default=2, help="blocks the scale part removes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.part in ("smollm2", "all"):
        results["smollm2"] = bench_smollm2(args.smollm2, args.workdir, args.threshold)
    if args.part in ("scale", "all"):
        results["scale"] = bench_scale(args.blocks, args.workdir, args.smollm2, args.scale_remove)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
