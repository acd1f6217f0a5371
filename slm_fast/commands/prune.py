"""`slm-fast prune SRC OUT`: depth-prune a checkpoint by sliding layer merging."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm_fast.baselines import METHODS
from slm_fast.checkpoint.writer import parse_size
from slm_fast.compensate import COMPENSATIONS
from slm_fast.criteria import CRITERIA
from slm_fast.merge import RULES
from slm_fast.prune import SEARCHES, PruneOptions, prune

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = PruneOptions()
    parser = subparsers.add_parser(
        "prune",
        help="prune a checkpoint by sliding layer merging (SLM)",
        description=(
            "Calibrate the model block by block, scan windows of consecutive blocks from the top down, "
            "merge every window whose merged model stays similar to the original, and write the pruned "
            "checkpoint with slm_report.json. Give exactly one target."
        ),
    )
    parser.add_argument("source", type=Path, help="Hugging Face checkpoint folder (safetensors)")
    parser.add_argument("output", type=Path, help="output folder (written atomically)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--threshold", type=float, help="similarity threshold T (a window passes while S > T)")
    target.add_argument("--remove", type=int, help="number of blocks to remove (T is searched)")
    target.add_argument("--ratio", type=float, help="fraction of parameters to remove (T is searched)")
    parser.add_argument(
        "--preset",
        choices=("default", "reference"),
        default="default",
        help="reference: the paper code's exact procedure (cosine, keep_high_norms_low, 10x128 tokens, its edge cases)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=defaults.method,
        help="slm, or a peer baseline: shortgpt (block influence), gromov (angular distance), laco, last-n, "
        "sleb (greedy removal by calibration perplexity)",
    )
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default=defaults.search,
        help="slm window search: best-first (each removal where the whole model stays most similar; the "
        "default, see bench/quality.md) or sliding (the paper's top-down scan)",
    )
    parser.add_argument("--laco-merge-layers", type=int, default=defaults.laco_merge_layers, help="LaCo's MERGE_LAYERS")
    parser.add_argument("--laco-interval", type=int, default=defaults.laco_interval, help="LaCo's INTERVAL")
    parser.add_argument("--criterion", choices=CRITERIA, default=defaults.criterion)
    parser.add_argument("--rule", choices=RULES, default=defaults.rule, help="merge rule")
    parser.add_argument("--calib", default=defaults.calib, help="calibration corpus name or .txt/.jsonl path")
    parser.add_argument("--samples", type=int, default=defaults.n_samples, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration sample")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--protect-top", type=int, default=defaults.protect_top, help="top blocks never merged")
    parser.add_argument(
        "--protect-bottom", type=int, default=defaults.protect_bottom, help="bottom blocks never merged"
    )
    parser.add_argument(
        "--speculate",
        type=int,
        default=defaults.speculate,
        help="window extents evaluated per pass (each upper block loaded once for all)",
    )
    parser.add_argument(
        "--compensate",
        choices=COMPENSATIONS,
        default=defaults.compensate,
        help="linear: after selection, fit on the calibration states a linear map per pruned span, folded into "
        "the down projection of the block that replaces it (ReplaceMe-style; same architecture out)",
    )
    parser.add_argument(
        "--compensate-ridge",
        type=float,
        default=defaults.compensate_ridge,
        help="ridge toward no correction, relative to the mean eigenvalue of M^T M",
    )
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: checkpoint's)")
    parser.add_argument("--memory-budget", default="8GB", help="memory for resident blocks and hidden states")
    parser.add_argument("--shard-size", default="2GB", help="maximum bytes per output shard")
    parser.add_argument("--out-dtype", choices=list(DTYPES), default=None, help="output dtype (default: source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = PruneOptions(
        threshold=args.threshold,
        remove=args.remove,
        ratio=args.ratio,
        preset=args.preset,
        method=args.method,
        search=args.search,
        laco_merge_layers=args.laco_merge_layers,
        laco_interval=args.laco_interval,
        criterion=args.criterion,
        rule=args.rule,
        calib=args.calib,
        n_samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        protect_top=args.protect_top,
        protect_bottom=args.protect_bottom,
        speculate=args.speculate,
        compensate=args.compensate,
        compensate_ridge=args.compensate_ridge,
        device=args.device,
        dtype=DTYPES.get(args.dtype),
        memory_budget=parse_size(args.memory_budget),
        shard_size=parse_size(args.shard_size),
        out_dtype=DTYPES.get(args.out_dtype),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(prune(args.source, args.output, options).summary())
    return 0
