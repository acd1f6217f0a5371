"""The quality protocol: every choice is made on validation text, every reported figure is on held-out
text, with standard errors.

- Validation (choices only, never reported as a result): *Mansfield Park* and a slice of LAMBADA.
- Held-out (the report): *Pride and Prejudice* and BoolQ's Wikipedia passages.
- Calibration: 10 x 128 tokens of *Emma* (seed 1234), as for every method in bench/quality.py.

Each corpus is scored on its first `--windows` non-overlapping windows of 512 tokens; a window's mean
next-token NLL is one observation, so perplexity is exp(mean) with a standard error over windows
(delta method: se(ppl) = ppl x se(mean NLL)), and two models are compared by the paired difference of
their window NLLs (same windows), whose standard error is much smaller than either model's.

A "+comp" row whose row without compensation has been pruned reuses that selection: the search is
deterministic, so `prune --compensate linear` would choose the same; the bench calibrates, fits and
writes exactly as prune does (slm_fast.compensate.fit_linear, export with the fold) and reports the
base row's calibration + search seconds plus the compensation's and the write's.

The default configuration is the one of lowest mean validation log-perplexity among those run; the
held-out table then says where it wins and where it loses. Results accumulate in a JSON file (an
interrupted run resumes), pruned models in --workdir (an existing OUT with slm_report.json is reused).

    PYTHONPATH=. python bench/quality_protocol.py --model /work/wt/smollm2 --remove 6 \
        --configs default default+comp sleb sleb+comp

(PYTHONPATH=. makes the in-process parts import this tree when another one is installed editable.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from harness import run_child, slm_fast_command

VALIDATION = ("austen:mansfield_park", "lambada")
HELD_OUT = ("austen:pride_and_prejudice", "boolq")
SEQ_LEN = 512
COMPENSATE = ["--compensate", "linear"]
# "+comp" uses the default ridge (1, chosen on validation: the "ridge" rows); "+comp ridge R" another.
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "default+comp": COMPENSATE,
    "default+comp ridge 0.01": [*COMPENSATE, "--compensate-ridge", "0.01"],
    "kl best-first": ["--criterion", "kl"],
    "kl best-first+comp": ["--criterion", "kl", *COMPENSATE],
    "sleb": ["--method", "sleb"],
    "sleb+comp": ["--method", "sleb", *COMPENSATE],
    "sleb+comp ridge 0.01": ["--method", "sleb", *COMPENSATE, "--compensate-ridge", "0.01"],
    "sleb+comp ridge 10": ["--method", "sleb", *COMPENSATE, "--compensate-ridge", "10"],
    "shortgpt": ["--method", "shortgpt"],
    "shortgpt+comp": ["--method", "shortgpt", *COMPENSATE],
    "gromov": ["--method", "gromov"],
    "laco": ["--method", "laco"],
    "last-n": ["--method", "last-n"],
    "paper preset": ["--preset", "reference"],
}


def prune(model: Path, out: Path, remove: int, flags: list[str]) -> dict:
    if not (out / "slm_report.json").is_file():
        command = slm_fast_command(
            "--threads", "1", "prune", str(model), str(out), "--remove", str(remove), "--overwrite", "--no-progress",
            *flags,
        )  # fmt: skip
        run = run_child(command)
        if run.returncode != 0:
            raise SystemExit(f"prune failed: {' '.join(command)}\n{run.output}")
    report = json.loads((out / "slm_report.json").read_text())
    timings = report["timings_s"]
    return {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": report["windows"],
        "dropped": report["dropped"],
        "compensation": report.get("compensation"),
    }


def compensate_selection(model: Path, base: Path, out: Path, flags: list[str]) -> dict:
    """`base`'s selection (its slm_report.json) with --compensate linear (and the ridge in `flags`, if
    any), written to `out`."""
    from slm_fast.checkpoint.reader import CheckpointReader
    from slm_fast.compensate import fit_linear
    from slm_fast.export import export_merged_checkpoint
    from slm_fast.prune import PruneOptions, calibration_ids
    from slm_fast.runtime.cache import HiddenStateCache
    from slm_fast.runtime.stream import BlockRunner, calibrate
    from slm_fast.windows import output_blocks

    report = json.loads((base / "slm_report.json").read_text())
    options = PruneOptions(**report["options"])
    if "--compensate-ridge" in flags:
        options.compensate_ridge = float(flags[flags.index("--compensate-ridge") + 1])
    reader = CheckpointReader(model)
    windows, dropped = [tuple(w) for w in report["windows"]], report["dropped"]
    tick = time.perf_counter()
    runner, cache = BlockRunner(reader, block_budget_bytes=10**9), HiddenStateCache()
    calibrate(runner, calibration_ids(reader.folder, options), cache, progress=False)
    plan = output_blocks(windows, reader.num_blocks, dropped)
    fitted = fit_linear(runner, cache, plan, rule=report["rule"], ridge=options.compensate_ridge, progress=False)
    cache.close()
    seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    export_merged_checkpoint(reader, out, windows, dropped=dropped, rule=report["rule"], overwrite=True,
                             progress=False, block_transform=fitted.fold)  # fmt: skip
    write = time.perf_counter() - tick
    base_timings = report["timings_s"]
    timings = {"calibrate": base_timings["calibrate"], "search": base_timings["search"], "compensate": seconds}
    timings["write"] = write
    return {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": report["windows"],
        "dropped": dropped,
        "compensation": fitted.to_json(),
        "derived_from": str(base),
    }


def window_nlls(model: Path, corpus: str, windows: int) -> list[float]:
    """Mean next-token NLL (nats) of each of the first `windows` windows of `corpus`, block-streamed."""
    from transformers import AutoTokenizer

    from slm_fast.checkpoint.reader import CheckpointReader
    from slm_fast.data import evaluation_windows, load_corpus
    from slm_fast.evaluation.streaming import stream_batches, target_log_probs
    from slm_fast.runtime.stream import BlockRunner

    ids = evaluation_windows(AutoTokenizer.from_pretrained(model), load_corpus(corpus), SEQ_LEN, windows)
    runner = BlockRunner(CheckpointReader(model))
    batches = list(ids.split(4))
    nlls: list[float] = []
    for index, hidden in stream_batches(runner, batches, 2 * 10**9, progress=False):
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        log_probs = target_log_probs(runner, rows, batches[index][:, 1:].reshape(-1), 512)
        nlls += (-log_probs.reshape(len(batches[index]), -1).mean(1)).tolist()
    return nlls


def summary(nlls: list[float]) -> tuple[float, float]:
    """(perplexity, its standard error) from per-window NLLs."""
    mean = statistics.fmean(nlls)
    se = statistics.stdev(nlls) / math.sqrt(len(nlls))
    return math.exp(mean), math.exp(mean) * se


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-window NLL difference a - b (same windows)."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(len(diff))


def score(model: Path, windows: int) -> dict[str, list[float]]:
    return {corpus: window_nlls(model, corpus, windows) for corpus in VALIDATION + HELD_OUT}


def validation_score(row: dict) -> float:
    return statistics.fmean(statistics.fmean(row["nll"][c]) for c in VALIDATION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--title", default="SmolLM2-135M-Instruct")
    parser.add_argument("--remove", type=int, nargs="+", default=[6])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per corpus")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_protocol"))
    parser.add_argument("--results", type=Path, default=Path("bench/quality_protocol.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/quality_protocol.md"))
    parser.add_argument("--table-only", action="store_true", help="write --out from --results, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}

    def save() -> None:
        args.results.write_text(json.dumps(results, indent=1) + "\n")

    if not args.table_only:
        if "dense" not in results:
            results["dense"] = {"nll": score(args.model, args.windows)}
            save()
        for remove in args.remove:
            for name in args.configs:
                key = f"{remove}/{name}"
                if "nll" in results.get(key, {}):
                    continue
                out = _outdir(args.workdir, remove, name)
                base = _outdir(args.workdir, remove, name.split("+comp")[0])
                if "+comp" in name and (base / "slm_report.json").is_file() and not out.exists():
                    row = {"prune": compensate_selection(args.model, base, out, CONFIGS[name])}
                else:
                    row = {"prune": prune(args.model, out, remove, CONFIGS[name])}
                row["nll"] = score(out, args.windows)
                results[key] = row
                print(f"{key}: validation {validation_score(row):.4f}", flush=True)
                save()
    args.out.write_text(markdown(results, args))
    print(args.out.read_text())


def _outdir(workdir: Path, remove: int, name: str) -> Path:
    return workdir / f"{remove}-{name.replace(' ', '_')}"


def markdown(results: dict, args: argparse.Namespace) -> str:
    windows = len(results["dense"]["nll"][HELD_OUT[0]])
    lines = [
        f"# Quality protocol: {args.title}",
        "",
        f"Generated {time.strftime('%Y-%m-%d')} by `python bench/quality_protocol.py` on this CPU (1 thread). "
        "Calibration: 10 x 128 tokens of *Emma* (seed 1234). Validation (used only to choose): *Mansfield Park* "
        f"and LAMBADA; held-out (reported): *Pride and Prejudice* and BoolQ passages; {windows} windows of "
        f"{SEQ_LEN} tokens each. Perplexity ± standard error over windows. `val` = mean validation log-perplexity "
        "(lower is better); the chosen configuration per removal is the lowest `val`, marked **chosen**. "
        "Prune seconds include calibration, search, compensation and writing. `+comp` = `--compensate linear` "
        "at the default ridge (1, chosen here on validation), `ridge R` at another.",
        "",
    ]
    header = ["model", "val (log ppl)", *[f"PPL {c}" for c in HELD_OUT], "prune s", "selection", ""]
    removals = sorted({int(k.split("/")[0]) for k in results if k != "dense"})
    for remove in removals:
        keys = [k for k in results if k.startswith(f"{remove}/") and "nll" in results[k]]
        if not keys:
            continue
        chosen = min(keys, key=lambda k: validation_score(results[k]))
        lines += [f"## {remove} blocks removed", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append(_row("dense", results["dense"], ""))
        for key in sorted(keys, key=lambda k: validation_score(results[k])):
            lines.append(_row(key.split("/", 1)[1], results[key], "**chosen**" if key == chosen else ""))
        lines += ["", "Paired differences in held-out mean NLL per window (nats; negative = the first is better):", ""]
        for first, second in _pairs(results, remove):
            parts = []
            for corpus in HELD_OUT:
                mean, se = paired(results[first]["nll"][corpus], results[second]["nll"][corpus])
                parts.append(f"{corpus}: {mean:+.4f} ± {se:.4f}")
            lines.append(f"- {first.split('/', 1)[1]} vs {second.split('/', 1)[1]}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines) + "\n"


def _pairs(results: dict, remove: int) -> list[tuple[str, str]]:
    """Each compensated configuration against the same selection without compensation, and the chosen
    one against every other."""
    keys = [k for k in results if k.startswith(f"{remove}/") and "nll" in results[k]]
    pairs = [(k, k.split("+comp")[0]) for k in keys if "+comp" in k and k.split("+comp")[0] in keys]
    chosen = min(keys, key=lambda k: validation_score(results[k]))
    pairs += [(chosen, k) for k in keys if k != chosen and (chosen, k) not in pairs]
    return pairs


def _row(name: str, row: dict, mark: str) -> str:
    ppl = []
    for corpus in HELD_OUT:
        value, se = summary(row["nll"][corpus])
        ppl.append(f"{value:.2f} ± {se:.2f}")
    info = row.get("prune")
    seconds = "" if info is None else f"{info['seconds']:.0f}"
    selection = "" if info is None else _selection(info)
    if info is not None and info.get("derived_from"):
        mark = " ".join(filter(None, [mark, "(selection of the row without comp)"]))
    val = f"{validation_score(row):.4f}"
    return "| " + " | ".join([name, val, *ppl, seconds, selection, mark]) + " |"


def _selection(info: dict) -> str:
    windows = [f"{lo}-{hi}" for lo, hi in info["windows"]]
    dropped = [str(b) for b in info.get("dropped") or []]
    return " ".join(windows + ([f"drop {','.join(dropped)}"] if dropped else []))


if __name__ == "__main__":
    main()
