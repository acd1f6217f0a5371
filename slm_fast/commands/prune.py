"""`slm-fast prune SRC OUT`: depth-prune a checkpoint by sliding layer merging."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm_fast.baselines import METHODS
from slm_fast.checkpoint.writer import parse_size
from slm_fast.compensate import COMPENSATIONS
from slm_fast.criteria import CRITERIA
from slm_fast.merge import AVERAGE_SETTINGS, RULES
from slm_fast.prune import SEARCHES, PruneOptions, estimate, prune

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Options --preset reference fixes: parsed with default None so that an explicit one is recognised.
# argparse dest -> PruneOptions field.
PRESET_OPTIONS = {
    "method": "method",
    "compensate": "compensate",
    "criterion": "criterion",
    "rule": "rule",
    "samples": "n_samples",
    "seq_len": "seq_len",
    "seed": "seed",
    "search": "search",
}
AVERAGE_HELP = (
    "per-layer settings (attention type, sliding window, RoPE) of a window merged by mean/sum/rdsc: its "
    "low (default) or high block's; keep_high and keep_high_norms_low take the high block's, keep_low the low's"
)
MODEL_HELP = "checkpoint folder (safetensors), or a Hub id org/name[@revision] from the local Hugging Face cache"
CALIB_HELP = (
    "calibration text: austen:emma (the default, shipped with the package), another corpus name, a .txt "
    "(documents separated by blank lines), .jsonl or .parquet file, a datasets save_to_disk folder, or a "
    "cached datasets spec NAME[:CONFIG][:SPLIT]; documents are packed into --samples x --seq-len tokens"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = PruneOptions()
    parser = subparsers.add_parser(
        "prune",
        help="prune a checkpoint by sliding layer merging (SLM) and linear compensation",
        description=(
            "Calibrate the model block by block, choose what to remove (by default sliding layer merging: "
            "windows of consecutive blocks whose merged model stays similar to the original, grown best-first; "
            "or a peer's method), fit a linear compensation of each pruned span, and write the pruned "
            "checkpoint with slm_report.json. Give exactly one target. Under torchrun (several "
            "processes, GPUs or hosts) the same command runs as a pipeline over blocks, each rank holding a "
            "slice of them."
        ),
    )
    parser.add_argument("source", help=MODEL_HELP)
    parser.add_argument("output", type=Path, help="output folder (written atomically)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--threshold", type=float, help="similarity threshold T (a window passes while S > T)")
    target.add_argument("--remove", type=int, help="number of blocks to remove (T is searched)")
    target.add_argument("--ratio", type=float, help="fraction of parameters to remove (T is searched)")
    parser.add_argument(
        "--preset",
        choices=("default", "reference"),
        default="default",
        help="reference: the paper code's exact procedure (cosine, keep_high_norms_low, the sliding scan, 10 "
        "random 128-token windows of whole documents, seed 1234, its edge cases); refuses other values of those",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help=f"default {defaults.method} (sliding layer merging; with --compensate linear the lowest mean validation "
        "perplexity over bench/quality_choice.md's table), or a peer baseline: sleb (greedy removal by calibration "
        "perplexity), shortgpt (block influence), gromov (angular distance), laco, last-n",
    )
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default=None,
        help="slm window search: best-first (each removal where the whole model stays most similar; the "
        f"default, see bench/quality.md) or sliding (the paper's top-down scan; default {defaults.search})",
    )
    parser.add_argument("--laco-merge-layers", type=int, default=defaults.laco_merge_layers, help="LaCo's MERGE_LAYERS")
    parser.add_argument("--laco-interval", type=int, default=defaults.laco_interval, help="LaCo's INTERVAL")
    parser.add_argument("--criterion", choices=CRITERIA, default=None, help=f"default {defaults.criterion}")
    parser.add_argument("--rule", choices=RULES, default=None, help=f"merge rule (default {defaults.rule})")
    parser.add_argument(
        "--average-settings", choices=AVERAGE_SETTINGS, default=defaults.average_settings, help=AVERAGE_HELP
    )
    parser.add_argument("--calib", default=defaults.calib, help=CALIB_HELP)
    parser.add_argument(
        "--calib-field", default=defaults.calib_field, help="text field of .jsonl/.parquet/datasets calibration"
    )
    parser.add_argument("--samples", type=int, default=None, help=f"calibration samples (default {defaults.n_samples})")
    parser.add_argument(
        "--seq-len", type=int, default=None, help=f"tokens per calibration sample (default {defaults.seq_len})"
    )
    parser.add_argument("--seed", type=int, default=None, help=f"calibration seed (default {defaults.seed})")
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
        default=None,
        help="linear (default): after selection, fit on the calibration states a linear map per pruned span, "
        "folded into the down projection of the block that replaces it (ReplaceMe-style; same architecture "
        "out); none: the selection as it is",
    )
    parser.add_argument(
        "--compensate-ridge",
        type=float,
        default=defaults.compensate_ridge,
        help="ridge toward no correction, relative to the mean eigenvalue of M^T M",
    )
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--compute-dtype",
        "--dtype",
        dest="dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype the blocks run in, e.g. bf16 scoring of an fp32 checkpoint on CUDA (default: checkpoint's)",
    )
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="memory for resident blocks and hidden states, e.g. 128MB (default: from free GPU memory on CUDA, "
        "available RAM on the CPU; printed at start); the rest goes to host memory, then --work-dir",
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="samples per block call (default: from the budget)"
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="folder for the run's progress and spilled states (default: .OUT.work beside OUT)",
    )
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its work folder")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cost model's figures for this run and exit (writes nothing)"
    )
    parser.add_argument("--shard-size", default="2GB", help="maximum bytes per output shard")
    parser.add_argument("--out-dtype", choices=list(DTYPES), default=None, help="output dtype (default: source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run, distributed=True)


def run(args: argparse.Namespace) -> int:
    given = {field: getattr(args, arg) for arg, field in PRESET_OPTIONS.items() if getattr(args, arg) is not None}
    options = PruneOptions(
        threshold=args.threshold,
        remove=args.remove,
        ratio=args.ratio,
        preset=args.preset,
        laco_merge_layers=args.laco_merge_layers,
        laco_interval=args.laco_interval,
        average_settings=args.average_settings,
        calib=args.calib,
        calib_field=args.calib_field,
        protect_top=args.protect_top,
        protect_bottom=args.protect_bottom,
        speculate=args.speculate,
        compensate_ridge=args.compensate_ridge,
        device=args.device,
        dtype=DTYPES.get(args.dtype),
        memory_budget=None if args.memory_budget is None else parse_size(args.memory_budget),
        micro_batch=args.micro_batch,
        work_dir=args.work_dir,
        resume=args.resume,
        shard_size=parse_size(args.shard_size),
        out_dtype=DTYPES.get(args.out_dtype),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        explicit=frozenset(given),
        **given,
    )
    main = args.launch.is_main
    if args.dry_run:  # the cost model of one process: printed by rank 0; the other ranks have nothing to do
        if main:
            print(estimate(args.source, options))
        return 0
    report = prune(args.source, args.output, options)
    if main:
        print(report.summary())
    return 0
