"""`slm-fast evaluate MODEL`: perplexity on named corpora and lm-evaluation-harness tasks,
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
        help="perplexity and lm-evaluation-harness tasks on a checkpoint, block-streamed",
        description=(
            "Perplexity of windows of each --ppl corpus, and any lm-evaluation-harness task (log-likelihood, "
            "rolling, greedy generation; --tasks: names, groups or tags; 'all' = the seven tasks of the "
            "layer-pruning papers, which run offline from local files) on the first --limit documents. Blocks "
            "are read one at a time, so the "
            "model need not fit in memory. --tasks needs `pip install 'slm-fast[eval]'`. Under torchrun each "
            "process scores a share of the windows and documents and rank 0 reports the numbers of one process."
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
        "--stride",
        type=int,
        default=None,
        help="sliding windows every STRIDE tokens, each scoring only the tokens past the previous window "
        "(Hugging Face's protocol; default: non-overlapping windows)",
    )
    parser.add_argument(
        "--bos-every-window", action="store_true", help="start every window with BOS (default: the text's own BOS)"
    )
    parser.add_argument(
        "--tasks", default=None, help="'all' or comma-separated harness tasks/groups: boolq,piqa,hellaswag,mmlu,..."
    )
    parser.add_argument(
        "--limit", type=_limit, default=200, help="first N documents of each task, or 'all' (default: 200)"
    )
    parser.add_argument(
        "--hub-tasks",
        action="store_true",
        help="use the harness's own datasets (network) for the seven tasks too, not the local copies",
    )
    parser.add_argument(
        "--include-path", type=Path, action="append", default=[], help="folder of extra harness task YAMLs"
    )
    parser.add_argument(
        "--add-bos-token",
        choices=["auto", "yes", "no"],
        default="auto",
        help="BOS on task requests: auto = the tokenizer's default, as the harness's hf model (default: auto)",
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
    parser.add_argument(
        "--no-shared-prefixes",
        action="store_true",
        help="score each task request as its own row (default: requests sharing a context run it once, as a "
        "prefix tree with tree attention; the scores are the same)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run, distributed=True)


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
    import tempfile
    import time

    started = time.perf_counter()
    if not args.ppl and args.tasks is None:
        raise InputError("nothing to evaluate: give --ppl CORPUS ... and/or --tasks")
    if args.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.stride is not None and (args.stride < 1 or args.bos_every_window):
        raise InputError("--stride must be >= 1 and cannot be combined with --bos-every-window")
    with tempfile.TemporaryDirectory(prefix="slm_fast_tasks_") as workdir:
        return _evaluate(args, Path(workdir), started)


def _evaluate(args: argparse.Namespace, workdir: Path, started: float) -> int:
    import time

    import torch
    import torch.distributed as dist

    from slm_fast.checkpoint.locate import resolve_model
    from slm_fast.checkpoint.reader import CheckpointReader
    from slm_fast.checkpoint.staging import staged_file
    from slm_fast.devices import check_device
    from slm_fast.evaluation import perplexity
    from slm_fast.evaluation.report import EvaluationReport
    from slm_fast.parallel.data_parallel import check_same_input, max_over_ranks, sum_over_ranks, together
    from slm_fast.runtime.stream import BlockRunner

    launch = args.launch
    group = dist.group.WORLD if launch.distributed else None
    tasks, lm_eval_version, manager = [], None, None
    with together(launch):  # every rank checks its input; all fail together before any scoring
        if launch.is_main and args.json is not None and not args.json.parent.is_dir():
            raise InputError(f"--json {args.json}: folder {args.json.parent} does not exist")
        budget = parse_size(args.memory_budget)
        check_device(args.device)
        reader = CheckpointReader(args.model)
        tokenizer = _tokenizer(resolve_model(args.tokenizer) if args.tokenizer else reader.folder)
        if args.tasks is not None:
            from slm_fast.evaluation.harness import lm_eval_version as installed_lm_eval
            from slm_fast.evaluation.harness import parse_tasks, prepare_tasks

            lm_eval_version = installed_lm_eval()  # a clear error now if the extra is missing
            tasks = parse_tasks(args.tasks)
            manager = prepare_tasks(
                tasks,
                workdir=workdir,
                local=not args.hub_tasks,
                include_path=args.include_path,
                limit=args.limit,
                processes=launch.world_size,
            )
        windows = {corpus: _windows(tokenizer, corpus, args) for corpus in args.ppl}
    for corpus, ids in windows.items():
        check_same_input(launch, f"--ppl {corpus}", ids)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    # Half the budget keeps blocks resident (a model that fits is read once), half holds hidden states.
    runner = BlockRunner(reader, args.device, dtype, block_budget_bytes=budget // 2)
    streaming = dict(
        hidden_budget_bytes=budget // 2,
        batch_tokens=args.batch_tokens,
        progress=launch.is_main and not args.no_progress,
    )
    report = EvaluationReport(
        model=str(args.model),
        limit=args.limit,
        settings={
            "seq_len": args.seq_len,
            "max_windows": args.max_windows,
            "stride": args.stride,
            "bos_every_window": args.bos_every_window,
            "add_bos_token": args.add_bos_token,
            "task_data": "hub" if args.hub_tasks else "local for the seven tasks",
            "device": str(runner.device),
            "dtype": str(runner.dtype).removeprefix("torch."),
            "memory_budget_bytes": budget,
            "batch_tokens": args.batch_tokens,
            "shared_prefixes": not args.no_shared_prefixes and runner.supports_trees,
            "blocks": reader.num_blocks,
            "lm_eval_version": lm_eval_version,
        },
    )
    for corpus, ids in windows.items():
        report.perplexity[corpus] = perplexity(
            runner, ids, stride=args.stride, desc=f"ppl {corpus}", process_group=group, **streaming
        )
    counters = {"block_loads": runner.blocks_loaded}
    if tasks:
        from slm_fast.evaluation.harness import evaluate_tasks
        from slm_fast.evaluation.harness_lm import StreamedLM

        add_bos = {"auto": None, "yes": True, "no": False}[args.add_bos_token]
        lm = StreamedLM(
            runner,
            tokenizer,
            add_bos_token=add_bos,
            share_prefixes=not args.no_shared_prefixes,
            process_group=group,
            **streaming,
        )
        outcome = evaluate_tasks(lm, tasks, limit=args.limit, manager=manager)  # None on ranks other than 0
        if outcome is not None:
            report.tasks, report.groups = outcome.tasks, outcome.groups
            report.settings["task_versions"] = outcome.versions
        counters = {
            "block_loads": runner.blocks_loaded,
            "requests": lm.requests_scored,
            "rows": lm.rows_run,
            "tokens": lm.tokens_run,
            "generated_tokens": lm.generated_tokens,
        }
    # Counters are summed over the processes (each reads the model); peak RSS is the largest process's.
    report.run |= sum_over_ranks(counters, launch) | {
        "seconds": time.perf_counter() - started,
        "blocks": reader.num_blocks,
        "peak_rss_bytes": max_over_ranks(_peak_rss_bytes(), launch),
        "lm_eval_version": lm_eval_version,
        "processes": launch.world_size,
    }
    if not launch.is_main:
        return 0
    print(report.table())
    if args.json is not None:
        with staged_file(args.json) as staged:
            staged.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: cannot load a tokenizer ({exc}); point --tokenizer at one") from exc


def _windows(tokenizer: PreTrainedTokenizerBase, corpus: str, args: argparse.Namespace) -> torch.Tensor:
    from slm_fast.data import DOCUMENT_SEPARATOR, evaluation_windows, load_corpus
    from slm_fast.evaluation import strided_windows

    documents = load_corpus(corpus)
    try:
        if args.stride is None:
            return evaluation_windows(
                tokenizer, documents, args.seq_len, args.max_windows, bos_every_window=args.bos_every_window
            )
        ids = tokenizer(DOCUMENT_SEPARATOR.join(documents), verbose=False)["input_ids"]
        return strided_windows(ids, args.seq_len, args.stride, args.max_windows)
    except InputError as exc:
        raise InputError(f"corpus {corpus!r}: {exc}") from exc
