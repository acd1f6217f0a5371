"""`slm-fast evaluate MODEL`: perplexity on named corpora and zero-shot accuracy on the seven tasks,
block-streamed (one block in memory at a time when the model does not fit)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from slm_fast.checkpoint.writer import parse_size
from slm_fast.commands.prune import MODEL_HELP
from slm_fast.errors import InputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="perplexity and zero-shot accuracy of a checkpoint",
        description=(
            "Perplexity of consecutive windows of each --ppl corpus, and lm-eval-harness-style zero-shot "
            "accuracy (acc / acc_norm) on the first --limit validation documents of each task. Blocks "
            "are read one at a time, so the model need not fit in memory."
        ),
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument(
        "--ppl",
        nargs="+",
        action="extend",
        default=[],
        metavar="CORPUS",
        help="corpus names (lambada, boolq, austen, austen:<novel>, brown), .txt/.jsonl/.parquet files, "
        "save_to_disk folders or cached datasets specs NAME[:CONFIG][:SPLIT]",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    parser.add_argument("--max-windows", type=int, default=16, help="windows per corpus, from its start (default: 16)")
    parser.add_argument(
        "--bos-every-window", action="store_true", help="start every window with BOS (default: the text's own BOS)"
    )
    parser.add_argument(
        "--tasks", default=None, help="'all' or comma-separated: boolq,piqa,hellaswag,winogrande,arc_easy,..."
    )
    parser.add_argument(
        "--limit", type=_limit, default=200, help="first N documents of each task, or 'all' (default: 200)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or cached Hub id (default: MODEL's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: checkpoint's)")
    parser.add_argument(
        "--memory-budget", default="8GB", help="memory for resident blocks and hidden states (default: 8GB)"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=4096, help="padded tokens per block call (bounds activation memory)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from slm_fast.checkpoint.locate import resolve_model
    from slm_fast.checkpoint.reader import CheckpointReader
    from slm_fast.devices import check_device
    from slm_fast.evaluation import EvaluationReport, evaluate_task, parse_tasks, perplexity
    from slm_fast.runtime.stream import BlockRunner

    if not args.ppl and args.tasks is None:
        raise InputError("nothing to evaluate: give --ppl CORPUS ... and/or --tasks")
    if args.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"--json {args.json}: folder {args.json.parent} does not exist")
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    budget = parse_size(args.memory_budget)
    check_device(args.device)
    reader = CheckpointReader(args.model)
    tokenizer = _tokenizer(resolve_model(args.tokenizer) if args.tokenizer else reader.folder)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    # Half the budget keeps blocks resident (a model that fits is read once), half holds hidden states.
    runner = BlockRunner(reader, args.device, dtype, block_budget_bytes=budget // 2)
    streaming = dict(hidden_budget_bytes=budget // 2, batch_tokens=args.batch_tokens, progress=not args.no_progress)
    report = EvaluationReport(
        model=str(args.model),
        limit=args.limit,
        settings={
            "seq_len": args.seq_len,
            "max_windows": args.max_windows,
            "bos_every_window": args.bos_every_window,
            "device": str(runner.device),
            "dtype": str(runner.dtype).removeprefix("torch."),
            "memory_budget_bytes": budget,
            "batch_tokens": args.batch_tokens,
            "blocks": reader.num_blocks,
        },
    )
    for corpus in args.ppl:
        windows = _windows(tokenizer, corpus, args.seq_len, args.max_windows, args.bos_every_window)
        report.perplexity[corpus] = perplexity(runner, windows, desc=f"ppl {corpus}", **streaming)
    for name in tqdm(tasks, desc="tasks", unit="task", disable=args.no_progress or not tasks):
        report.tasks.append(evaluate_task(runner, tokenizer, name, limit=args.limit, **streaming))
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot load a tokenizer ({exc}); point --tokenizer at one") from exc


def _windows(
    tokenizer: PreTrainedTokenizerBase, corpus: str, seq_len: int, max_windows: int, bos_every_window: bool
) -> torch.Tensor:
    from slm_fast.data import evaluation_windows, load_corpus

    documents = load_corpus(corpus)
    try:
        return evaluation_windows(tokenizer, documents, seq_len, max_windows, bos_every_window=bos_every_window)
    except InputError as exc:
        raise InputError(f"corpus {corpus!r}: {exc}") from exc
