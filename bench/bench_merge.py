"""Streaming merge benchmark: `slm-fast merge` on synthetic checkpoints with Llama-3-8B-sized blocks
(hidden 4096, intermediate 14336, 32/8 heads, bf16: 0.44 GB per block) at 4 and 16 blocks.

For each size and rule it reports the median wall time of the CLI run, bytes read and written per
second, and the child's peak RSS from the OS; the same run measures this machine's disk write and
cold-read throughput as the baseline. Source pages are evicted from the page cache before every run,
so reads come from the disk. Peak RSS should stay flat from 4 to 16 blocks (a block or two plus
small buffers: the writer never holds a shard).

    python bench/bench_merge.py [--workdir /tmp/slm_fast_bench] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from harness import (
    GB,
    BlockShape,
    disk_throughput,
    evict_from_page_cache,
    median,
    run_checked,
    slm_fast_command,
    write_synthetic_checkpoint,
)

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.windows import output_blocks, parse_windows

SHAPE = BlockShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000)
WINDOWS = {4: "1-2", 16: "1-2,5-8,10-13"}
RULES = ("keep_high", "mean")


def bytes_read(reader: CheckpointReader, windows: str, rule: str) -> int:
    """Source bytes a merge touches: keep_high reads a window's top block, mean reads all of it."""
    total = sum(reader.entry(name).nbytes for name in reader.other_names)
    for lo, hi in output_blocks(parse_windows(windows), reader.num_blocks):
        blocks = [hi] if rule == "keep_high" else range(lo, hi + 1)
        total += sum(reader.block_nbytes(b) for b in blocks)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for another run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    disk = disk_throughput(args.workdir)
    print(f"disk: write {disk['write_gb_s']:.2f} GB/s (fsync), cold read {disk['read_gb_s']:.2f} GB/s")
    rows = []
    for blocks, windows in WINDOWS.items():
        source = args.workdir / f"synthetic-{blocks}"
        if not (source / "config.json").exists():
            size = write_synthetic_checkpoint(source, SHAPE, blocks)
            print(f"built {source}: {size / GB:.2f} GB")
        reader = CheckpointReader(source)
        for rule in RULES:
            output = args.workdir / f"merged-{blocks}-{rule}"
            runs = []
            for _ in range(args.repeats):
                evict_from_page_cache(source)
                command = slm_fast_command(
                    "--threads", "1", "merge", str(source), str(output), "--windows", windows,
                    "--rule", rule, "--overwrite", "--no-progress",
                )  # fmt: skip
                run = run_checked(command)
                runs.append(run)
            written = sum(p.stat().st_size for p in output.iterdir() if p.suffix == ".safetensors")
            read = bytes_read(reader, windows, rule)
            seconds = median([r.seconds for r in runs])
            rows.append(
                {
                    "blocks": blocks,
                    "block_gb": reader.block_nbytes(0) / GB,
                    "windows": windows,
                    "rule": rule,
                    "seconds_median": seconds,
                    "seconds_all": [r.seconds for r in runs],
                    "read_gb": read / GB,
                    "written_gb": written / GB,
                    "read_gb_s": read / GB / seconds,
                    "write_gb_s": written / GB / seconds,
                    "io_gb_s": (read + written) / GB / seconds,
                    "peak_rss_gb": max(r.peak_rss_bytes for r in runs) / GB,
                }
            )
            shutil.rmtree(output)
        if not args.keep:
            shutil.rmtree(source)

    print(
        f"\n{'blocks':>6} {'rule':>9} {'time s':>7} {'read GB':>8} {'write GB':>8} {'read GB/s':>9} "
        f"{'write GB/s':>10} {'(r+w) GB/s':>10} {'peak RSS GB':>11}"
    )
    for row in rows:
        print(
            f"{row['blocks']:>6} {row['rule']:>9} {row['seconds_median']:>7.1f} {row['read_gb']:>8.2f} "
            f"{row['written_gb']:>8.2f} {row['read_gb_s']:>9.2f} {row['write_gb_s']:>10.2f} {row['io_gb_s']:>10.2f} "
            f"{row['peak_rss_gb']:>11.2f}"
        )
    baseline = f"write {disk['write_gb_s']:.2f} GB/s, read {disk['read_gb_s']:.2f} GB/s"
    print(f"block size {rows[0]['block_gb']:.2f} GB; disk baseline {baseline}")
    if args.json:
        args.json.write_text(json.dumps({"disk": disk, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
