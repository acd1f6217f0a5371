"""`slm-fast heal MODEL OUT --lora | --partial`: recover a pruned model by brief fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm_fast.healing import HealOptions, heal


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = HealOptions()
    parser = subparsers.add_parser(
        "heal",
        help="fine-tune a pruned checkpoint briefly (LoRA, or the head and last blocks) and merge it back",
        description=(
            "Train on a text corpus with the SLM paper's LoRA recipe (default) or Lu et al.'s partial "
            "fine-tuning, then write a plain checkpoint with the adapters merged, heal_report.json and "
            "loss_curve.png. Interrupted runs resume from the work folder."
        ),
    )
    parser.add_argument("model", type=Path, help="checkpoint folder (e.g. the output of slm-fast prune)")
    parser.add_argument("output", type=Path, help="output folder (written atomically)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora", help="LoRA r=8 (default)")
    mode.add_argument(
        "--partial", dest="mode", action="store_const", const="partial", help="train lm_head and the last blocks"
    )
    parser.set_defaults(mode=defaults.mode)
    parser.add_argument("--corpus", default=defaults.corpus, help="corpus name or .txt/.jsonl path, like --calib")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument("--cutoff", type=int, default=defaults.cutoff, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument("--partial-blocks", type=int, default=defaults.partial_blocks, help="last blocks trained")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="where to train: cpu, cuda, cuda:1, ...")
    parser.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between resume points")
    parser.add_argument("--work", type=Path, default=None, help="resume folder (default: next to OUTPUT)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = HealOptions(
        mode=args.mode,
        corpus=args.corpus,
        steps=args.steps,
        batch_size=args.batch_size,
        cutoff=args.cutoff,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        partial_blocks=args.partial_blocks,
        seed=args.seed,
        device=args.device,
        save_every=args.save_every,
        work=args.work,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(heal(args.model, args.output, options).summary())
    return 0
