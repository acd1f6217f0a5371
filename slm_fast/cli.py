"""`slm-fast` command line: one subcommand per module in slm_fast/commands/.

Each command module defines `register(subparsers)`, which adds its parser and sets `run=` to a
function taking the parsed arguments and returning an exit status, and `distributed=True` when the
command runs on several processes under torchrun (`args.launch` then says which rank this is).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch.distributed as dist

from slm_fast import commands
from slm_fast.errors import SlmFastError
from slm_fast.parallel.launch import from_environment, join, leave, peer_lost
from slm_fast.settings import configure_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm-fast", description="Depth pruning of LLMs by sliding layer merging, out of core."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: $SLM_FAST_THREADS or torch's)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch = args.launch = from_environment()
    joined_here = not dist.is_initialized()
    status = _run(args, launch)
    if joined_here and dist.is_initialized():
        leave()
        # Skip interpreter finalisation after a distributed run: gloo's worker threads can still hold
        # tensors whose release needs the GIL of a dying interpreter, which aborts the process (SIGABRT,
        # "terminate called without an active exception"; about one run in five here).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _run(args: argparse.Namespace, launch) -> int:
    where = f"[rank {launch.rank}] " if launch.distributed else ""
    try:
        configure_threads(args.threads)
        if launch.distributed and not getattr(args, "distributed", False):
            raise SlmFastError(
                f"{args.command} does not run on several processes (WORLD_SIZE={launch.world_size}); "
                "run it without torchrun"
            )
        join(launch)
        try:
            return int(args.run(args) or 0)
        except dist.DistError as exc:
            raise peer_lost(launch, exc) from exc
    except SlmFastError as exc:
        print(f"{where}slm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
