"""`slm-fast` command line: one subcommand per module in slm_fast/commands/.

Each command module defines `register(subparsers)`, which adds its parser and sets `run=` to a
function taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from slm_fast import commands
from slm_fast.errors import SlmFastError
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
    try:
        configure_threads(args.threads)
        return int(args.run(args) or 0)
    except SlmFastError as exc:
        print(f"slm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
