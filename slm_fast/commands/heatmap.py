"""`slm-fast heatmap SRC --out heat.png`: L x L CKA of block outputs on calibration text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slm_fast.checkpoint.writer import parse_size
from slm_fast.commands.prune import CALIB_HELP, MODEL_HELP

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "heatmap",
        help="L x L CKA of block outputs (the paper's patch-like figure), block-streamed",
        description=(
            "Run calibration text through the model one block at a time, then draw the CKA between every "
            "pair of block outputs (residual stream, every token a point) with a colour bar, and write the "
            "numbers as JSON next to the image. Under torchrun each process runs its share of the samples and "
            "the CKA is computed across the processes (exact); rank 0 writes the files."
        ),
    )
    parser.add_argument("source", help=MODEL_HELP)
    parser.add_argument("--out", type=Path, required=True, help="image path (PNG); the JSON goes beside it")
    parser.add_argument("--kernel", choices=("linear", "rbf"), default="linear")
    parser.add_argument("--calib", default="austen:emma", help=CALIB_HELP)
    parser.add_argument("--calib-field", default="text", help="text field of .jsonl/.parquet/datasets calibration")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: checkpoint's)")
    parser.add_argument("--memory-budget", default="8GB", help="host memory for the block outputs")
    parser.add_argument("--backend", default="auto", help="similarity backend: auto, tiled, triton, cuda")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run, distributed=True)


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from slm_fast.checkpoint.locate import load_tokenizer
    from slm_fast.checkpoint.reader import CheckpointReader
    from slm_fast.checkpoint.staging import staged_file
    from slm_fast.data import load_corpus, pack_calibration
    from slm_fast.devices import check_device
    from slm_fast.errors import InputError
    from slm_fast.heatmap import block_output_cka
    from slm_fast.parallel.data_parallel import check_same_input, together
    from slm_fast.plotting import plot_similarity_heatmap

    launch = args.launch
    with together(launch):  # every rank checks its input; all fail together before any work
        if launch.is_main and not args.out.parent.is_dir():  # only rank 0 writes
            raise InputError(f"--out {args.out}: folder {args.out.parent} does not exist")
        check_device(args.device)
        folder = CheckpointReader(args.source).folder  # refuses what cannot be read before calibration
        tokenizer = load_tokenizer(folder)
        ids = pack_calibration(
            tokenizer, load_corpus(args.calib, field=args.calib_field), args.samples, args.seq_len, args.seed
        )
    check_same_input(launch, f"--calib {args.calib}", ids)
    heatmap = block_output_cka(
        folder,
        ids,
        kernel=args.kernel,
        device=args.device,
        dtype=None if args.dtype is None else getattr(torch, DTYPES[args.dtype]),
        memory_budget=parse_size(args.memory_budget),
        backend=args.backend,
        progress=launch.is_main and not args.no_progress,
        process_group=dist.group.WORLD if launch.distributed else None,
    )
    if not launch.is_main:
        return 0
    title = f"{Path(args.source).name}: {args.kernel} CKA of block outputs ({heatmap.tokens} tokens of {args.calib})"
    json_path = args.out.with_suffix(".json")
    record = heatmap.to_json() | {"calib": args.calib, "processes": launch.world_size}
    with staged_file(args.out) as image, staged_file(json_path) as numbers:
        plot_similarity_heatmap(heatmap.matrix, image, title=title)
        numbers.write_text(json.dumps(record, indent=1) + "\n")
    where = f" on {launch.world_size} processes" if launch.distributed else ""
    print(f"wrote {args.out} and {json_path}: {heatmap.matrix.shape[0]} blocks, {heatmap.seconds:.1f} s{where}")
    return 0
