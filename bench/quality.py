"""The quality table: does sliding layer merging beat the other depth-pruning methods on SmolLM2-135M?

Every configuration prunes the same checkpoint with the same calibration (10 x 128 tokens of Emma,
seed 1234) through `slm-fast prune`, then `slm-fast evaluate` scores it:
- stage 1, every configuration: perplexity on two held-out corpora (Pride and Prejudice, BoolQ's
  Wikipedia paragraphs), 8 windows of 512 tokens each;
- stage 2, the dense model, the reference preset, the best SLM configurations of stage 1 and every
  baseline: the seven zero-shot tasks on their first --limit documents.
Results accumulate in a JSON file (an interrupted run resumes) and are written as a markdown table.

    python bench/quality.py --model runs/smollm2 --remove 4 8 --limit 200 --out bench/quality.md
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from harness import explicit_configuration, run_checked, slm_fast_command

from slm_fast.checkpoint.reader import CheckpointReader

PPL_CORPORA = ("austen:pride_and_prejudice", "boolq")
PAPER_METRICS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The sliding scan (the paper's) with every criterion and rule; the best-first search with the rules
# worth comparing under the cosine criterion, and linear CKA with keep_high. The sliding scan
# with a CKA criterion is measured at the smaller removal only (`--sliding-cka-at`).
CRITERIA = ("cosine", "cka-linear", "cka-rbf")
SLIDING_RULES = ("keep_high", "keep_high_norms_low", "mean", "keep_low", "sum", "rdsc")
# keep_low and cka-rbf are left out: in a first run they chose the same models as keep_high and
# cka-linear at both removals.
BEST_FIRST = (
    *(("cosine", rule) for rule in ("keep_high", "mean", "rdsc", "keep_high_norms_low")),
    ("cka-linear", "keep_high"),
)
BASELINES = ("shortgpt", "gromov", "laco", "last-n")


def configurations(remove: int, sliding_cka_at: int) -> dict[str, list[str]]:
    configs = {"slm reference preset": ["--preset", "reference"]}
    for criterion in CRITERIA:
        if criterion != "cosine" and remove != sliding_cka_at:
            continue
        for rule in SLIDING_RULES if criterion == "cosine" else SLIDING_RULES[:4]:
            configs[f"slm sliding {criterion} {rule}"] = [
                "--search",
                "sliding",
                "--criterion",
                criterion,
                "--rule",
                rule,
            ]
    for criterion, rule in BEST_FIRST:
        configs[f"slm best-first {criterion} {rule}"] = [
            "--search",
            "best-first",
            "--criterion",
            criterion,
            "--rule",
            rule,
        ]
    for method in BASELINES:
        configs[method] = ["--method", method]
    return configs


def prune(model: Path, out: Path, remove: int, flags: list[str]) -> dict:
    command = slm_fast_command(
        "--threads", "1", "prune", str(model), str(out), "--remove", str(remove), "--overwrite", "--no-progress",
        *explicit_configuration(flags),
    )  # fmt: skip
    run = run_checked(command)
    report = json.loads((out / "slm_report.json").read_text())
    return {
        "seconds": run.seconds,
        "windows": report["windows"],
        "dropped": report["dropped"],
        "similarity": report["similarity"],
        "parameters": report["parameters"]["after"],
        "blocks": json.loads((out / "config.json").read_text())["num_hidden_layers"],
        "threshold_search": report.get("threshold_search"),
    }


def evaluate(model: Path, flags: list[str], scratch: Path) -> dict:
    scratch.mkdir(parents=True, exist_ok=True)
    result_path = scratch / "eval.json"
    command = slm_fast_command("--threads", "1", "evaluate", str(model), "--json", str(result_path), "--no-progress")
    run = run_checked([*command, *flags])
    result = json.loads(result_path.read_text())
    result["seconds"] = run.seconds
    return result


def perplexities(model: Path, scratch: Path) -> dict[str, float]:
    result = evaluate(model, ["--ppl", *PPL_CORPORA, "--seq-len", "512", "--max-windows", "8"], scratch)
    return {corpus: result["perplexity"][corpus]["ppl"] for corpus in PPL_CORPORA}


def zero_shot(model: Path, limit: int, scratch: Path) -> dict[str, float]:
    result = evaluate(model, ["--tasks", "all", "--limit", str(limit)], scratch)
    return {task: result["zero_shot"]["tasks"][task]["score"] for task in PAPER_METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--remove", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--title", default="SmolLM2-135M-Instruct", help="model name in the table's title")
    parser.add_argument("--configs", nargs="+", default=None, help="only these rows (names as in the table)")
    parser.add_argument("--limit", type=int, default=200, help="documents per zero-shot task (0: perplexity only)")
    parser.add_argument("--best", type=int, default=2, help="SLM configurations of stage 1 carried to stage 2")
    parser.add_argument("--sliding-cka-at", type=int, default=4, help="removal at which sliding+CKA rows run")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model (another run scores it)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_quality"))
    parser.add_argument("--results", type=Path, default=Path("bench/quality.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/quality.md"))
    parser.add_argument("--table-only", action="store_true", help="write --out from --results, run nothing")
    args = parser.parse_args()
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if args.table_only:
        args.out.write_text(markdown(results, args))
        return

    def save() -> None:
        args.results.write_text(json.dumps(results, indent=1) + "\n")

    dense = results.setdefault("dense", {})
    if "ppl" not in dense and not args.no_dense:
        dense["ppl"] = perplexities(args.model, args.workdir / "dense")
        save()
    for remove in args.remove:
        for name, flags in configurations(remove, args.sliding_cka_at).items():
            if args.configs is not None and name not in args.configs:
                continue
            row = results.setdefault(f"{remove}/{name}", {})
            if "ppl" in row:
                continue
            out = args.workdir / f"{remove}-{name.replace(' ', '_')}"
            row["prune"] = prune(args.model, out, remove, flags)
            row["ppl"] = perplexities(out, args.workdir / "eval")
            if args.limit == 0:  # no stage 2 will score it: free the disk (a 0.5B model is 2.5 GB in fp32)
                shutil.rmtree(out)
            print(f"{remove} {name}: {row['prune']['blocks']} blocks, ppl {row['ppl']}", flush=True)
            save()

    if "zero_shot" not in dense and not args.no_dense and args.limit > 0:
        dense["zero_shot"] = zero_shot(args.model, args.limit, args.workdir / "dense")
        save()
    for remove in args.remove if args.limit > 0 else ():
        for name in stage_two(results, remove, args.best):
            row = results[f"{remove}/{name}"]
            if "zero_shot" in row:
                continue
            out = args.workdir / f"{remove}-{name.replace(' ', '_')}"
            if not out.exists():
                row["prune"] = prune(args.model, out, remove, configurations(remove, args.sliding_cka_at)[name])
            row["zero_shot"] = zero_shot(out, args.limit, args.workdir / "eval")
            print(f"{remove} {name}: zero-shot {row['zero_shot']}", flush=True)
            save()
    args.out.write_text(markdown(results, args))
    print(args.out.read_text())
    shutil.rmtree(args.workdir, ignore_errors=True)


def stage_two(results: dict, remove: int, best: int) -> list[str]:
    """The reference preset, the `best` SLM configurations by mean log-perplexity, every baseline."""
    slm = [
        k.split("/", 1)[1]
        for k in results
        if k.startswith(f"{remove}/slm ") and "preset" not in k and "ppl" in results[k]
    ]
    # Identical perplexities mean identical models (keep_high over [a, b] drops what keep_low over [a-1, b-1] does):
    # keep the first of each, in rank order.
    by_score: dict[float, str] = {}
    for name in sorted(slm, key=lambda name: _ppl_score(results[f"{remove}/{name}"])):
        by_score.setdefault(_ppl_score(results[f"{remove}/{name}"]), name)
    chosen = ["slm reference preset", *list(by_score.values())[:best], *BASELINES]
    return [name for name in chosen if "ppl" in results.get(f"{remove}/{name}", {})]


def _ppl_score(row: dict) -> float:
    return sum(math.log(v) for v in row["ppl"].values()) / len(row["ppl"])


def markdown(results: dict, args: argparse.Namespace) -> str:
    tasks = list(PAPER_METRICS)
    source = CheckpointReader(args.model)
    blocks = source.num_blocks
    parameters = sum(loc.entry.nbytes // loc.entry.dtype.itemsize for loc in source.locations.values())
    header = ["model", "blocks", "params (M)", "PPL P&P", "PPL BoolQ", *tasks, "avg", "avg w/o BoolQ", "prune s"]
    header.append("merged")
    zero_shot_note = (
        f"Zero-shot: first {args.limit} validation documents of each task, lm-eval-harness prompts; acc for "
        "BoolQ, PIQA, WinoGrande, ARC-e; acc_norm (length in characters of the choice, as the harness) for "
        "HellaSwag, ARC-c, OBQA; avg = plain mean of the seven. BoolQ is mostly a yes-bias test at this size "
        "(the dense model scores below the 62% of always answering yes), hence the average without it. Rows "
        "without zero-shot scores were ranked on perplexity only (stage 1)."
        if args.limit > 0
        else "Perplexity only (no zero-shot run)."
    )
    lines = [
        f"# Quality table: {args.title} ({blocks} blocks)",
        "",
        f"Generated {time.strftime('%Y-%m-%d')} by `python bench/quality.py` on this CPU (1 thread; prune "
        "seconds depend on how busy the machine was). Calibration: 10 x 128 tokens of *Emma* (seed 1234) for "
        "every method. Perplexity: 8 windows of 512 tokens of *Pride and Prejudice* and of BoolQ's Wikipedia "
        f"paragraphs (never calibration text). {zero_shot_note} Merged: windows collapsed into one block each, "
        "or blocks dropped (source numbering).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    dense = results["dense"]
    if "ppl" in dense:
        lines.append(_row("dense", blocks, parameters / 1e6, dense, None, tasks, ""))
    order = {
        name: i
        for i, name in enumerate(configurations(0, 0) | configurations(args.sliding_cka_at, args.sliding_cka_at))
    }
    scored = (k for k in results if k != "dense" and "ppl" in results[k])
    keys = sorted(scored, key=lambda k: (int(k.split("/")[0]), order[k.split("/", 1)[1]]))
    for key in keys:
        row = results[key]
        remove, name = key.split("/", 1)
        prune_info = row["prune"]
        label = f"-{remove}: {name}"
        lines.append(
            _row(label, prune_info["blocks"], prune_info["parameters"] / 1e6, row, prune_info["seconds"], tasks,
                 _merged(prune_info))
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def _row(
    label: str, blocks: int, params: float, row: dict, seconds: float | None, tasks: list[str], merged: str
) -> str:
    ppl = [f"{row['ppl'][c]:.2f}" for c in PPL_CORPORA]
    if "zero_shot" in row:
        scores = [100 * row["zero_shot"][t] for t in tasks]
        without_boolq = [s for t, s in zip(tasks, scores, strict=True) if t != "boolq"]
        zs = [f"{s:.1f}" for s in scores]
        zs += [f"**{sum(scores) / len(scores):.2f}**", f"**{sum(without_boolq) / len(without_boolq):.2f}**"]
    else:
        zs = [""] * (len(tasks) + 2)
    timing = "" if seconds is None else f"{seconds:.0f}"
    return "| " + " | ".join([label, str(blocks), f"{params:.1f}", *ppl, *zs, timing, merged]) + " |"


def _merged(prune_info: dict) -> str:
    windows = [f"{lo}-{hi}" for lo, hi in prune_info["windows"]]
    dropped = [str(block) for block in prune_info.get("dropped") or []]
    return " ".join(windows + ([f"drop {','.join(dropped)}"] if dropped else []))


if __name__ == "__main__":
    main()
