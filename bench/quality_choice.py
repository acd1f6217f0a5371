"""The default chosen over the whole quality table: one configuration for every model and removal.

bench/quality_protocol.py chooses per cell (one model, one removal); a default must serve them all.
Here each candidate (by default every pruning configuration measured in every cell of the given
protocol result files) is scored by its validation log-perplexity averaged over the cells where all
candidates ran (each cell weighs the same), and the lowest is the choice. Its margin over every other
candidate is the paired per-window difference of the validation NLLs, pooled over the cells (each
window of each cell one observation). Healed rows are not pruning configurations and are not
candidates. Held-out text plays no part here.

    python bench/quality_choice.py bench/quality_protocol.json=SmolLM2 \
        bench/quality_protocol_qwen25.json=Qwen2.5 --out bench/quality_choice.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from quality_protocol import HELD_OUT, paired, summary, validation_windows


def cells(tables: dict[str, dict]) -> dict[tuple[str, int], dict[str, list[float]]]:
    """(model, removal) -> {configuration: validation NLL per window}, pruning configurations only."""
    found: dict[tuple[str, int], dict[str, list[float]]] = {}
    for model, results in tables.items():
        for key, row in results.items():
            if key == "dense" or "nll" not in row or "heal" in row:
                continue
            removal, name = key.split("/", 1)
            found.setdefault((model, int(removal)), {})[name] = validation_windows(row)
    return found


def held_out(tables: dict[str, dict], choice: dict) -> list[str]:
    """Where the choice wins and loses: per cell, its paired per-window held-out NLL difference from
    every other candidate (negative = the choice is better)."""
    lines = []
    for model, removal in choice["cells"]:
        results = tables[model]
        ours = results[f"{removal}/{choice['chosen']}"]["nll"]
        for name in choice["ranked"][1:]:
            theirs = results[f"{removal}/{name}"]["nll"]
            parts = ["{}: {:+.4f} ± {:.4f}".format(c, *paired(ours[c], theirs[c])) for c in HELD_OUT]
            lines.append(f"- {model} -{removal}, vs {name}: " + "; ".join(parts))
    return lines


def overview(tables: dict[str, dict], choice: dict) -> list[str]:
    """Held-out perplexity of every candidate in every cell beside its prune seconds, in the order of
    the validation ranking, dense first: the report a reader compares the choice by."""
    cells_ = choice["cells"]

    def cell(row: dict) -> str:
        ppl = " / ".join(_ppl(summary(row["nll"][corpus])[0]) for corpus in HELD_OUT)
        return ppl + (f" ({row['prune']['seconds']:.0f} s)" if "prune" in row else "")

    header = ["configuration", *[f"{model} -{removal}" for model, removal in cells_]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense = [cell(tables[model]["dense"]) if "dense" in tables[model] else "" for model, _ in cells_]
    lines.append("| " + " | ".join(["dense", *dense]) + " |")
    for name in choice["ranked"]:
        values = [cell(tables[model][f"{removal}/{name}"]) for model, removal in cells_]
        lines.append("| " + " | ".join([f"**{name}**" if name == choice["chosen"] else name, *values]) + " |")
    return lines


def _ppl(value: float) -> str:
    return f"{value:.1f}" if value < 1e4 else f"{value:.2g}".replace("e+0", "e").replace("e+", "e")


def choose(tables: dict[str, dict], candidates: list[str] | None = None) -> dict:
    """The candidate of lowest mean validation log-perplexity over the cells where every candidate
    ran (candidates: by default the configurations measured in every cell); each other candidate's
    pooled paired margin (it minus the choice: positive = the choice is better)."""
    table = cells(tables)
    if candidates is None:
        candidates = sorted(set.intersection(*(set(configs) for configs in table.values()))) if table else []
    used = {cell: configs for cell, configs in table.items() if all(c in configs for c in candidates)}
    if not candidates or not used:
        raise SystemExit("no configuration was measured in every cell")

    def mean_score(name: str) -> float:
        return statistics.fmean(statistics.fmean(configs[name]) for configs in used.values())

    def pooled(name: str) -> list[float]:
        return [v for configs in used.values() for v in configs[name]]

    ranked = sorted(candidates, key=mean_score)
    chosen = ranked[0]
    per_cell = {cell: min(candidates, key=lambda c: statistics.fmean(configs[c])) for cell, configs in used.items()}
    return {
        "chosen": chosen,
        "ranked": ranked,
        "scores": {n: mean_score(n) for n in ranked},
        "margins": {n: paired(pooled(n), pooled(chosen)) for n in ranked[1:]},
        "cells": sorted(used),
        "skipped": sorted(set(table) - set(used)),
        "cell_winners": per_cell,
        "table": used,
    }


def markdown(choice: dict, tables: dict[str, dict] | None = None) -> str:
    cells_ = choice["cells"]
    header = ["configuration", *[f"{model} -{removal}" for model, removal in cells_], "mean", "margin vs the choice"]
    lines = [
        "# The default over the whole table (validation only)",
        "",
        "Mean validation log-perplexity (*Mansfield Park* and LAMBADA, each cell's 512-token windows) per cell, "
        "for every pruning configuration measured in all cells; margin = its paired per-window difference "
        "from the choice, pooled over the cells (nats, ± standard error; positive = the choice is better). "
        "Generated by `python bench/quality_choice.py`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name in choice["ranked"]:
        values = [f"{statistics.fmean(choice['table'][cell][name]):.4f}" for cell in cells_]
        margin = "**chosen**" if name == choice["chosen"] else "{:+.4f} ± {:.4f}".format(*choice["margins"][name])
        lines.append("| " + " | ".join([name, *values, f"{choice['scores'][name]:.4f}", margin]) + " |")
    winners = sorted(choice["cell_winners"].items())
    winners = "; ".join(f"{model} -{removal}: {name}" for (model, removal), name in winners)
    lines += ["", f"Best per cell: {winners}."]
    if choice["skipped"]:
        skipped = ", ".join(f"{model} -{removal}" for model, removal in choice["skipped"])
        lines += ["", f"Not used (a candidate was not measured there): {skipped}."]
    if tables is not None:
        lines += [
            "",
            "Held-out perplexity (*Pride and Prejudice* / BoolQ passages; reported, never used to choose) and "
            "prune seconds (calibration, search, compensation, writing; one thread of a shared 2-core CPU):",
            "",
            *overview(tables, choice),
            "",
            "Held-out (reported, never used to choose): the choice minus each other candidate, paired per "
            "window, mean NLL in nats (negative = the choice is better):",
            "",
            *held_out(tables, choice),
        ]
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="FILE=MODEL", help="a protocol result file and its model's name")
    parser.add_argument("--out", type=Path, default=Path("bench/quality_choice.md"))
    parser.add_argument("--candidates", nargs="+", help="configurations to choose from (default: those in every cell)")
    args = parser.parse_args()
    tables = {}
    for item in args.results:
        path, _, model = item.partition("=")
        tables[model or Path(path).stem] = json.loads(Path(path).read_text())
    args.out.write_text(markdown(choose(tables, args.candidates), tables))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
