"""`slm-fast merge SRC OUT --windows 20-23,10-12`: merge chosen windows of blocks, streaming."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm_fast.checkpoint.writer import parse_size
from slm_fast.commands.prune import AVERAGE_HELP, MODEL_HELP
from slm_fast.export import export_merged_checkpoint
from slm_fast.merge import AVERAGE_SETTINGS, RULES
from slm_fast.windows import parse_windows

DTYPE_CHOICES = {"keep": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge windows of consecutive blocks of a checkpoint into one block each",
        description=(
            "Each window LO-HI (inclusive, source block numbering) collapses to one block at LO; the "
            "remaining blocks are renumbered. Reads and writes one block at a time."
        ),
    )
    parser.add_argument("source", help=MODEL_HELP)
    parser.add_argument("output", type=Path, help="output folder (written atomically)")
    parser.add_argument("--windows", required=True, help="comma-separated inclusive ranges, e.g. 20-23,10-12")
    parser.add_argument("--rule", choices=RULES, default="keep_high", help="merge rule (default: keep_high)")
    parser.add_argument("--average-settings", choices=AVERAGE_SETTINGS, default="low", help=AVERAGE_HELP)
    parser.add_argument("--shard-size", default="2GB", help="maximum bytes per output shard (default: 2GB)")
    parser.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep", help="output dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    dtype_name = DTYPE_CHOICES[args.dtype]
    result = export_merged_checkpoint(
        args.source,
        args.output,
        parse_windows(args.windows),
        rule=args.rule,
        average_settings=args.average_settings,
        dtype=None if dtype_name is None else getattr(torch, dtype_name),
        max_shard_bytes=parse_size(args.shard_size),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(result.summary())
    return 0
