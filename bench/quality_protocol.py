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

A "sleb" row at fewer blocks than a recorded SLEB run is that run's first steps (SLEB is greedy, so
its steps are nested): the selection is written without searching, with that run's setup and
calibration seconds plus its search seconds at the end of the step (sleb_prefix).

A "+lora" / "+partial" row heals that configuration's pruned model with `slm-fast heal` on a budget
given once for all rows (--heal-steps, --heal-batch-size, --heal-cutoff, --heal-corpus: never a
validation or held-out text) and records it. When a recorded row's pruned model is gone (a healed
row's base, a zero-shot row), it is re-created without searching (restore_model: the recorded
selection, a SLEB prefix, a compensation fitted again, a heal run again on the recorded budget) and
checked against the row's validation NLLs.
`--zero-shot ROW ...` scores rows on the seven tasks through `slm-fast evaluate` (ARC-c, OBQA,
WinoGrande whole; the others on 500 documents), one task per run, with the harness's standard errors.
Different methods often choose the same model (SLEB dropping blocks 8-13 and SLM's keep_high window
8-14 write the same weights): a row whose weights equal a scored row's (weights_digest) takes its
scores, marked so, instead of being evaluated again.

Per removal, the pruning configuration of lowest mean validation log-perplexity is marked chosen;
bench/quality_choice.py chooses the default over every model and removal. The held-out table then says
where it wins and where it loses. Results accumulate in a JSON file (an interrupted run resumes),
pruned models in --workdir (an existing OUT with slm_report.json is reused).

    PYTHONPATH=. python bench/quality_protocol.py --model /work/wt/smollm2 --remove 6 \
        --configs slm slm+comp sleb sleb+comp slm+lora sleb+partial --zero-shot dense 6/sleb+comp

(PYTHONPATH=. makes the in-process parts import this tree when another one is installed editable.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
from harness import explicit_configuration, run_checked, slm_fast_command

VALIDATION = ("austen:mansfield_park", "lambada")
HELD_OUT = ("austen:pride_and_prejudice", "boolq")
SEQ_LEN = 512
SELECTION_FILE = "protocol_selection.json"  # beside a pruned model the protocol wrote without `prune`
COMPENSATE = ["--compensate", "linear"]
# "+comp" uses the default ridge (1, chosen on validation: the "ridge" rows); "+comp ridge R" another.
CONFIGS: dict[str, list[str]] = {
    "slm": [],  # sliding layer merging: best-first, cosine, keep_high (the default before SLEB + comp)
    "slm+comp": COMPENSATE,
    "slm+comp ridge 0.01": [*COMPENSATE, "--compensate-ridge", "0.01"],
    "slm kl": ["--criterion", "kl"],
    "slm kl+comp": ["--criterion", "kl", *COMPENSATE],
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


CONFIGS = {name: explicit_configuration(flags) for name, flags in CONFIGS.items()}
# "<config>+lora" / "<config>+partial": that configuration's pruned model healed by `slm-fast heal`.
HEALS = {"lora": "--lora", "partial": "--partial"}
HEALED_BASES = ("slm", "sleb", "shortgpt", "slm+comp", "sleb+comp")
CONFIGS |= {f"{base}+{mode}": CONFIGS[base] for base in HEALED_BASES for mode in HEALS}
# Texts a healing corpus must not be: the protocol's validation and held-out corpora.
NOT_FOR_HEALING = {"austen", "austen:mansfield_park", "austen:pride_and_prejudice", "lambada", "boolq"}
# Zero-shot: the seven local tasks; ARC-c (299 validation documents), OBQA (500) and WinoGrande (1267)
# whole, the others on their first ZERO_SHOT_DOCS documents.
ZERO_SHOT_DOCS = 500
ZERO_SHOT_WHOLE = ("arc_challenge", "openbookqa", "winogrande")
ZERO_SHOT_TASKS = ("arc_challenge", "openbookqa", "winogrande", "boolq", "piqa", "arc_easy", "hellaswag")


def prune(model: Path, out: Path, remove: int, flags: list[str]) -> dict:
    if not (out / "slm_report.json").is_file():
        command = slm_fast_command(
            "--threads", "1", "prune", str(model), str(out), "--remove", str(remove), "--overwrite", "--no-progress",
            *flags,
        )  # fmt: skip
        run_checked(command)
    report = json.loads((out / "slm_report.json").read_text())
    timings = report["timings_s"]
    record = {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": report["windows"],
        "dropped": report["dropped"],
        "rule": report["rule"],
        "compensation": report.get("compensation"),
        "options": report["options"],
    }
    if "sleb" in report:  # what sleb_prefix needs to derive every smaller removal
        record["sleb"] = {k: report["sleb"][k] for k in ("removal_order", "step_seconds") if k in report["sleb"]}
    return record


def sleb_prefix(model: Path, longer: dict, remove: int, out: Path) -> dict:
    """SLEB at `remove` blocks from the "prune" record of a SLEB run to more blocks: the greedy steps
    are nested (tests/test_logit_criteria.py::test_sleb_runs_are_nested), so a run to `remove` drops
    the first `remove` blocks of the longer run's removal order, and would have taken its setup and
    calibration plus the search seconds at the end of step `remove`. Written to `out` without
    searching (with a protocol_selection.json that +comp reads like a prune report)."""
    from slm_fast.export import export_merged_checkpoint

    dropped = sorted(longer["sleb"]["removal_order"][:remove])
    tick = time.perf_counter()
    export_merged_checkpoint(model, out, [], dropped=dropped, rule=longer["rule"], overwrite=True, progress=False)
    write = time.perf_counter() - tick
    before_search = {k: v for k, v in longer["timings"].items() if k not in ("search", "write", "compensate")}
    timings = before_search | {"search": longer["sleb"]["step_seconds"][remove - 1], "write": write}
    info = {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": [],
        "dropped": dropped,
        "rule": longer["rule"],
        "compensation": None,
        "options": longer["options"] | {"remove": remove},
        "prefix_of": len(longer["sleb"]["removal_order"]),
    }
    (out / SELECTION_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def longer_sleb(results: dict, remove: int) -> dict | None:
    """The "prune" record of the shortest recorded SLEB run to more than `remove` blocks that recorded
    its removal order and step seconds, if any."""
    runs = sorted(
        (int(key.split("/")[0]), row["prune"])
        for key, row in results.items()
        if key.endswith("/sleb") and "step_seconds" in row.get("prune", {}).get("sleb", {})
    )
    return next((record for removed, record in runs if removed > remove), None)


def base_selection(folder: Path) -> dict:
    """The selection a pruned folder holds (options, windows, dropped, rule, timings): its prune report,
    or the protocol_selection.json of a selection the protocol derived."""
    if (folder / "slm_report.json").is_file():
        report = json.loads((folder / "slm_report.json").read_text())
        return {k: report[k] for k in ("options", "windows", "dropped", "rule")} | {"timings": report["timings_s"]}
    return json.loads((folder / SELECTION_FILE).read_text())


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

    report = base_selection(base)
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
    # The base run's setup, calibration and search, then this fit and write.
    timings = {k: v for k, v in report["timings"].items() if k != "write"} | {"compensate": seconds, "write": write}
    return {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": report["windows"],
        "dropped": dropped,
        "compensation": fitted.to_json(),
        "derived_from": str(base),
    }


def config_options(flags: list[str], remove: int | None = None):
    """The PruneOptions `prune --remove N` runs with for a configuration's flags (method, preset rule,
    rule; calibration and everything else at the defaults, as every configuration here uses)."""
    from slm_fast.prune import REFERENCE_PRESET, PruneOptions

    options = PruneOptions(remove=remove)
    for flag, field in (("--method", "method"), ("--compensate", "compensate"), ("--rule", "rule")):
        if flag in flags:
            setattr(options, field, flags[flags.index(flag) + 1])
    if "--preset" in flags and flags[flags.index("--preset") + 1] == "reference":
        options = dataclasses.replace(options, preset="reference", **REFERENCE_PRESET)
    return options


def config_rule(flags: list[str]) -> str:
    """The merge rule `prune` applies for a configuration's flags (what slm_report.json records as "rule")."""
    return config_options(flags).merge_rule


def write_recorded_selection(model: Path, recorded: dict, rule: str, out: Path, check: dict[str, list[float]]) -> dict:
    """Write the selection of a measured row (its "prune" record: windows, dropped) to `out` without
    searching again, checked to be that row's model (check_recorded). The row keeps the recorded
    calibration and search seconds; the write's replace the recorded write's."""
    from slm_fast.export import export_merged_checkpoint

    windows, dropped = [tuple(w) for w in recorded["windows"]], recorded["dropped"]
    tick = time.perf_counter()
    export_merged_checkpoint(model, out, windows, dropped=dropped, rule=rule, overwrite=True, progress=False)
    write = time.perf_counter() - tick
    check_recorded(out, check)
    timings = {k: v for k, v in recorded["timings"].items() if k != "write"} | {"write": write}
    return {
        "seconds": sum(timings.values()),
        "timings": timings,
        "windows": recorded["windows"],
        "dropped": dropped,
        "rule": rule,
        "compensation": None,
        "recorded": True,  # the selection (and its search seconds) of the recorded row; checked as above
    }


# check_recorded's tolerances, in nats. Another selection or fit differs by far more than any of them: the
# closest two distinct models of either protocol table are 6e-2 apart (a ridge change).
# On the same machine the same computation repeats within summation-order noise: a re-heal further off than
# this is recorded as such (restore_model).
SAME_COMPUTATION = 1e-6
# The same deterministic computation (a recorded selection written again, a fit repeated) evaluated on another
# CPU: other SIMD widths reorder every float32 matmul of the forward, and the reorderings compound over its
# depth. Float32 window NLLs of 4-8 nats are 4.8e-7 apart per unit in the last place; Qwen2.5's 4/last-n,
# recorded on one machine, came back 1.03e-6 (2 ulps) off on another. 1e-5 allows 20 ulps and stays 6000x
# below the closest two distinct models.
RECOMPUTED = 1e-5
# Training is seeded but not bit-reproducible on another machine (other SIMD kernels and summation orders
# in every float32 step compound over the steps): a re-heal of SmolLM2's 6/sleb+comp+partial on another
# CPU differed by up to 8.7e-6 nats. 1e-4 allows 11x that and stays 40x below what one step of that
# heal changes (its loss fell 0.12 nats over 30 steps) or another learning rate would.
RETRAINED = 1e-4


def check_recorded(out: Path, check: dict[str, list[float]], tolerance: float = RECOMPUTED) -> float:
    """That the model in `out` is the recorded row's: the NLLs of the first batch (4 windows) of each
    validation corpus must equal the recorded ones within `tolerance`. Returns the largest difference."""
    gap = 0.0
    for corpus in VALIDATION:
        first = window_nlls(out, corpus, 4)
        gap = max(gap, *(abs(a - b) for a, b in zip(first, check[corpus][:4], strict=True)))
        if gap > tolerance:
            raise SystemExit(f"{out}: {corpus} window NLLs {first} differ from the recorded {check[corpus][:4]}")
    return gap


def restore_model(model: Path, workdir: Path, results: dict, key: str) -> Path:
    """The pruned model of the recorded row `key` ("6/sleb+comp") in `workdir`, re-created without
    searching when it is gone: a healed row by healing its restored base again on the recorded budget
    (training is seeded: the same weights on the same machine, within RETRAINED on another, recorded in
    the row's "restored"), a +comp row by fitting again on its restored base
    selection, a SLEB row as the first steps of a longer recorded run, any other from its recorded
    selection; each checked against the row's recorded validation NLLs (check_recorded)."""
    remove, name = key.split("/", 1)
    out = _outdir(workdir, remove, name)
    if (out / "config.json").is_file():
        return out
    row = results[key]
    base_name = name.split("+comp")[0]
    if (mode := _heal_mode(name)) is not None:
        base = restore_model(model, workdir, results, f"{remove}/{name.rsplit('+', 1)[0]}")
        heal_model(base, out, mode, row["heal"])
        gap = check_recorded(out, row["nll"], RETRAINED)
        if gap > SAME_COMPUTATION:  # the tasks scored from now on see these weights, not the recorded run's
            scored = sorted(row.get("zero_shot", {}))
            row["restored"] = {"nll_gap": gap, "weights_digest": weights_digest(out), "tasks_scored_before": scored}
    elif base_name != name:
        base = restore_model(model, workdir, results, f"{remove}/{base_name}")
        compensate_selection(model, base, out, CONFIGS[name])
        check_recorded(out, row["nll"])
    elif name == "sleb" and (longer := longer_sleb(results, int(remove))):
        sleb_prefix(model, longer, int(remove), out)
        check_recorded(out, row["nll"])
    else:
        info = write_recorded_selection(model, row["prune"], config_rule(CONFIGS[name]), out, row["nll"])
        options = row["prune"].get("options") or dataclasses.asdict(config_options(CONFIGS[name], int(remove)))
        (out / SELECTION_FILE).write_text(json.dumps(info | {"options": options}, indent=1) + "\n")
    return out


def heal_model(pruned: Path, out: Path, mode: str, budget: dict) -> dict:
    """`slm-fast heal PRUNED OUT --lora|--partial` with the budget (steps, batch size, cutoff, corpus,
    and lr where given: a recorded row's); the heal report's seconds, budget and loss means (first and
    last 10 steps)."""
    if not (out / "heal_report.json").is_file():
        lr = ["--lr", repr(budget["lr"])] if "lr" in budget else []
        command = slm_fast_command(
            "--threads", "1", "heal", str(pruned), str(out), HEALS[mode], "--steps", str(budget["steps"]),
            "--batch-size", str(budget["batch_size"]), "--cutoff", str(budget["cutoff"]), "--corpus",
            budget["corpus"], *lr, "--overwrite", "--no-progress",
        )  # fmt: skip
        run_checked(command)
    report = json.loads((out / "heal_report.json").read_text())
    losses = report["losses"]
    options = report["options"]
    return {
        "mode": mode,
        "seconds": report["seconds"],
        "steps": options["steps"],
        "batch_size": options["batch_size"],
        "cutoff": options["cutoff"],
        "corpus": options["corpus"],
        "lr": options["lr"],
        "tokens": options["steps"] * options["batch_size"] * options["cutoff"],
        "trainable_parameters": report["trainable_parameters"],
        "loss_first10": statistics.fmean(losses[:10]),
        "loss_last10": statistics.fmean(losses[-10:]),
    }


def zero_shot(model: Path, results: dict, save, device: str = "cpu") -> None:
    """The seven tasks through `slm-fast evaluate --tasks T --limit N --device D`, one task per run so
    that each finished task is kept (`results[task]`: the evaluate JSON's task record, seconds and
    device added); tasks already in `results` are not run again."""
    import tempfile

    for task in ZERO_SHOT_TASKS:
        if task in results:
            continue
        limit = "all" if task in ZERO_SHOT_WHOLE else str(ZERO_SHOT_DOCS)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "eval.json"
            command = slm_fast_command(
                "--threads", "1", "evaluate", str(model), "--tasks", task, "--limit", limit, "--json", str(path),
                "--device", device, "--no-progress",
            )  # fmt: skip
            run = run_checked(command)
            report = json.loads(path.read_text())
        record = report["zero_shot"]["tasks"][task]
        results[task] = record | {
            "seconds": run.seconds,
            "lm_eval": report["run"].get("lm_eval_version"),
            "device": device,
            "shared_prefixes": report["settings"].get("shared_prefixes", False),
        }
        print(f"  {task}: {record['metric']} {record['score']:.4f} ± {record['stderr']:.4f} ({run.seconds:.0f} s)")
        save()


def weights_digest(model: Path) -> str:
    """sha256 of a checkpoint's config (sorted) and of every tensor (name, dtype, shape, bytes) in its
    safetensors files, in name order: equal for the same model whatever wrote it."""
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256(json.dumps(json.loads((model / "config.json").read_text()), sort_keys=True).encode())
    shards = [safe_open(path, framework="pt") for path in sorted(model.glob("*.safetensors"))]
    holder = {name: shard for shard in shards for name in shard.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for name in sorted(holder):
        tensor = holder[name].get_tensor(name)
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def scored_twin(model: Path, workdir: Path, results: dict, key: str) -> str | None:
    """A row at the same removal with all seven tasks scored (not healed: re-creating those means
    training) whose weights equal `key`'s; digests are kept in the rows ("weights_digest"), a row's
    model re-created once to compute its own."""
    remove = key.split("/", 1)[0]

    def digest(name: str) -> str:
        if "weights_digest" not in results[name]:
            results[name]["weights_digest"] = weights_digest(restore_model(model, workdir, results, name))
        return results[name]["weights_digest"]

    candidates = [
        k for k, row in results.items()
        if k != key and row.get("zero_shot_of") != key and k.split("/", 1)[0] == remove and "heal" not in row
        and _zero_shot_complete(row)
    ]  # fmt: skip
    mine = digest(key)
    twin = next((k for k in candidates if digest(k) == mine), None)
    return results[twin].get("zero_shot_of", twin) if twin else None  # the row that was evaluated


def _zero_shot_complete(row: dict) -> bool:
    return all(task in row.get("zero_shot", {}) for task in ZERO_SHOT_TASKS)


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
        log_probs, _ = target_log_probs(runner, rows, batches[index][:, 1:].reshape(-1), 512)
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


def validation_windows(row: dict) -> list[float]:
    """A row's validation NLL per window: the mean over the validation corpora of that window's NLL."""
    return [statistics.fmean(values) for values in zip(*(row["nll"][c] for c in VALIDATION), strict=True)]


def validation_score(row: dict) -> float:
    return statistics.fmean(statistics.fmean(row["nll"][c]) for c in VALIDATION)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--title", default="SmolLM2-135M-Instruct")
    parser.add_argument("--remove", type=int, nargs="+", default=[6])
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), help="rows to measure (default: all, none with --zero-shot only)"
    )
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per corpus")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm_fast_protocol"))
    parser.add_argument("--results", type=Path, default=Path("bench/quality_protocol.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/quality_protocol.md"))
    parser.add_argument("--table-only", action="store_true", help="write --out from --results, run nothing")
    parser.add_argument("--heal-steps", type=int, default=40, help="healing budget: steps (every healed row)")
    parser.add_argument("--heal-batch-size", type=int, default=4, help="healing budget: sequences per step")
    parser.add_argument("--heal-cutoff", type=int, default=256, help="healing budget: tokens per sequence")
    parser.add_argument("--heal-corpus", default="brown", help="healing text (never a validation or held-out one)")
    parser.add_argument(
        "--zero-shot", nargs="+", default=[], metavar="ROW", help="recorded rows (dense, 6/slm+comp, ...): 7 tasks"
    )
    parser.add_argument("--zero-shot-device", default="cpu", help="where --zero-shot evaluates (cpu, cuda, cuda:1)")
    args = parser.parse_args(argv)
    if args.configs is None:  # --zero-shot alone scores recorded rows and measures no new one
        args.configs = [] if args.zero_shot else list(CONFIGS)
    if args.heal_corpus in NOT_FOR_HEALING:
        raise SystemExit(f"--heal-corpus {args.heal_corpus}: a validation or held-out text cannot train the model")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    budget = {"steps": args.heal_steps, "batch_size": args.heal_batch_size, "cutoff": args.heal_cutoff,
              "corpus": args.heal_corpus}  # fmt: skip

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
                mode = _heal_mode(name)
                uncompensated = _outdir(args.workdir, remove, name.split("+comp")[0])
                if mode is not None:
                    base_name = name.rsplit("+", 1)[0]
                    row = {"prune": pruned_model(args.model, args.workdir, results, remove, base_name)}
                    row["heal"] = heal_model(_outdir(args.workdir, remove, base_name), out, mode, budget)
                elif name == "sleb" and not _pruned(out) and (longer := longer_sleb(results, remove)):
                    row = {"prune": sleb_prefix(args.model, longer, remove, out)}
                elif "+comp" in name and _pruned(uncompensated) and not out.exists():
                    row = {"prune": compensate_selection(args.model, uncompensated, out, CONFIGS[name])}
                else:
                    row = {"prune": prune(args.model, out, remove, CONFIGS[name])}
                row["nll"] = score(out, args.windows)
                results[key] = row
                print(f"{key}: validation {validation_score(row):.4f}", flush=True)
                save()
        for key in args.zero_shot:
            if key not in results:
                raise SystemExit(f"--zero-shot {key}: no such row in {args.results}")
            model = args.model if key == "dense" else restore_model(args.model, args.workdir, results, key)
            scored = _zero_shot_complete(results[key])
            if key != "dense" and not scored and (twin := scored_twin(args.model, args.workdir, results, key)):
                results[key]["zero_shot"] = dict(results[twin]["zero_shot"])
                results[key]["zero_shot_of"] = twin
                print(f"zero-shot {key}: the weights of {twin}, whose scores it takes", flush=True)
                save()
                continue
            print(f"zero-shot {key}", flush=True)
            zero_shot(model, results[key].setdefault("zero_shot", {}), save, args.zero_shot_device)
    args.out.write_text(markdown(results, args))
    print(args.out.read_text())


def pruned_model(model: Path, workdir: Path, results: dict, remove: int, name: str) -> dict:
    """The pruned model of configuration `name` (in workdir), and its "prune" record: reused if there,
    re-created when its row is recorded (restore_model: the recorded record, marked so), else pruned."""
    out, key = _outdir(workdir, remove, name), f"{remove}/{name}"
    if (out / "slm_report.json").is_file() or "nll" not in results.get(key, {}):
        return prune(model, out, remove, CONFIGS[name])
    restore_model(model, workdir, results, key)
    return results[key]["prune"] | {"recorded": True}


def _pruned(folder: Path) -> bool:
    """Whether `folder` holds a pruned model whose selection base_selection reads."""
    if (folder / "slm_report.json").is_file():
        return True
    marker = folder / SELECTION_FILE
    return marker.is_file() and "options" in json.loads(marker.read_text())


def _heal_mode(name: str) -> str | None:
    mode = name.rsplit("+", 1)[-1]
    return mode if "+" in name and mode in HEALS else None


def _outdir(workdir: Path, remove: int | str, name: str) -> Path:
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
        "(lower is better); the chosen pruning configuration per removal is the lowest `val` among the rows "
        "without healing, marked **chosen**. Prune seconds include calibration, search, compensation and writing. "
        "`+comp` = `--compensate linear` at the default ridge (1, chosen here on validation), `ridge R` at another. "
        "`+lora` / `+partial` = that row's pruned model after `slm-fast heal --lora` / `--partial`; heal seconds "
        "beside it. *recorded selection*: the pruned model was re-written from the selection of an earlier run "
        "of the same configuration (checked: its validation NLLs on the first 4 windows equal the recorded ones) "
        "and its prune seconds are that run's. *first steps of the N-block run*: SLEB's selection at this removal "
        "is the first steps of its greedy run to N blocks (written without searching), its prune seconds that "
        "run's setup and calibration plus its search time at the end of the step.",
        "",
    ]
    lines += _heal_budgets(results)
    header = ["model", "val (log ppl)", *[f"PPL {c}" for c in HELD_OUT], "prune s", "heal s", "selection", ""]
    removals = sorted({int(k.split("/")[0]) for k in results if k != "dense"})
    for remove in removals:
        keys = _keys(results, remove)
        if not keys:
            continue
        chosen = _chosen(results, remove)
        lines += [f"## {remove} blocks removed", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append(_row("dense", results["dense"], ""))
        for key in sorted(keys, key=lambda k: validation_score(results[k])):
            lines.append(_row(key.split("/", 1)[1], results[key], "**chosen**" if key == chosen else ""))
        lines += ["", _validation_margin(results, remove)]
        lines += ["", "Paired differences in held-out mean NLL per window (nats; negative = the first is better):", ""]
        for first, second in _pairs(results, remove):
            parts = []
            for corpus in HELD_OUT:
                mean, se = paired(results[first]["nll"][corpus], results[second]["nll"][corpus])
                parts.append(f"{corpus}: {mean:+.4f} ± {se:.4f}")
            lines.append(f"- {first.split('/', 1)[1]} vs {second.split('/', 1)[1]}: " + "; ".join(parts))
        lines.append("")
    lines += _zero_shot_table(results)
    return "\n".join(lines) + "\n"


def _keys(results: dict, remove: int) -> list[str]:
    return [k for k in results if k.startswith(f"{remove}/") and "nll" in results[k]]


def _chosen(results: dict, remove: int) -> str:
    """The pruning configuration (healed rows aside) of lowest mean validation log-perplexity."""
    keys = [k for k in _keys(results, remove) if "heal" not in results[k]]
    return min(keys, key=lambda k: validation_score(results[k]))


def _validation_margin(results: dict, remove: int) -> str:
    """How clearly validation chose: the chosen configuration against the next two pruning
    configurations, paired per window on the mean of the validation corpora's NLLs."""
    chosen = _chosen(results, remove)
    others = [k for k in _keys(results, remove) if "heal" not in results[k] and k != chosen]
    runners = sorted(others, key=lambda k: validation_score(results[k]))[:2]
    parts = []
    for key in runners:
        mean, se = paired(validation_windows(results[chosen]), validation_windows(results[key]))
        parts.append(f"vs {key.split('/', 1)[1]} {mean:+.4f} ± {se:.4f}")
    return f"Validation margin of the choice (paired per window, nats): {chosen.split('/', 1)[1]} " + "; ".join(parts)


def _heal_budgets(results: dict) -> list[str]:
    budgets = {
        (h["steps"], h["batch_size"], h["cutoff"], h["corpus"], h["lr"])
        for row in results.values()
        if (h := row.get("heal"))
    }
    return [
        f"Healing budget: {steps} steps x {batch} sequences x {cutoff} tokens = {steps * batch * cutoff:,} tokens "
        f"of `{corpus}` (not a validation or held-out text), lr {lr:g}, the heal command's other defaults."
        for steps, batch, cutoff, corpus, lr in sorted(budgets)
    ] + ([""] if budgets else [])


def _zero_shot_table(results: dict) -> list[str]:
    """Per task: the papers' metric ± its standard error (harness), documents scored; the average of the
    seven and of the six without BoolQ (pruned models drift toward BoolQ's majority answer, which lifts
    their average), each with se = sqrt(sum se^2) / n (tasks independent). Rows by blocks removed."""
    scored = [k for k in results if results[k].get("zero_shot")]
    rows = sorted(scored, key=lambda k: 0 if k == "dense" else int(k.split("/")[0]))
    if not rows:
        return []
    without_boolq = tuple(name for name in ZERO_SHOT_TASKS if name != "boolq")
    lines = [
        "## Zero-shot",
        "",
        f"`slm-fast evaluate --tasks T`: ARC-c, OBQA and WinoGrande whole (validation splits), the others on "
        f"their first {ZERO_SHOT_DOCS} documents; the papers' metric (acc or acc_norm) ± standard error, in %. "
        "The averages (± their standard errors, tasks taken as independent) only where all seven ran; seconds "
        "marked with the device where a task ran off the CPU, and with `rows` where tasks were scored row by row "
        "(before prefix trees: ~1.8x the time); `= ROW` where the model's weights are ROW's (its scores, not run "
        "again); `re-healed after K` where the tasks after the first K were scored on the row's model healed again "
        "on another machine (its validation NLLs within the gap given of the recorded run's).",
        "",
        "| model | " + " | ".join(ZERO_SHOT_TASKS) + " | average | w/o boolq | s |",
        "|" + "---|" * (len(ZERO_SHOT_TASKS) + 4),
    ]
    for key in rows:
        tasks = results[key]["zero_shot"]
        cells = [
            f"{100 * t['score']:.1f} ± {100 * t['stderr']:.1f} ({t['documents']})" if (t := tasks.get(name)) else ""
            for name in ZERO_SHOT_TASKS
        ]
        complete = all(name in tasks for name in ZERO_SHOT_TASKS)
        averages = [_task_average(tasks, names) if complete else "" for names in (ZERO_SHOT_TASKS, without_boolq)]
        devices = sorted({t.get("device", "cpu") for t in tasks.values()} - {"cpu"})
        devices += ["rows"] if not all(t.get("shared_prefixes") for t in tasks.values()) else []
        if restored := results[key].get("restored"):
            devices.append(f"re-healed after {len(restored['tasks_scored_before'])} ({restored['nll_gap']:.0e} nats)")
        seconds = " ".join([f"{sum(t['seconds'] for t in tasks.values()):.0f}", *devices])
        if twin := results[key].get("zero_shot_of"):
            seconds = f"= {twin}"
        lines.append("| " + " | ".join([key, *cells, *averages, seconds]) + " |")
    return [*lines, ""]


def _task_average(tasks: dict, names: tuple[str, ...]) -> str:
    mean = statistics.fmean(tasks[n]["score"] for n in names)
    se = math.sqrt(sum(tasks[n]["stderr"] ** 2 for n in names)) / len(names)
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def _pairs(results: dict, remove: int) -> list[tuple[str, str]]:
    """Each compensated or healed configuration against the same selection without it, and the chosen
    one against every other pruning configuration."""
    keys = _keys(results, remove)
    pairs = [(k, k.split("+comp")[0]) for k in keys if "+comp" in k and k.split("+comp")[0] in keys]
    pairs += [(k, k.rsplit("+", 1)[0]) for k in keys if "heal" in results[k] and k.rsplit("+", 1)[0] in keys]
    chosen = _chosen(results, remove)
    others = [k for k in keys if k != chosen and "heal" not in results[k]]
    pairs += [(chosen, k) for k in others if (chosen, k) not in pairs]
    return pairs


def _row(name: str, row: dict, mark: str) -> str:
    ppl = []
    for corpus in HELD_OUT:
        value, se = summary(row["nll"][corpus])
        ppl.append(f"{value:.2f} ± {se:.2f}" if value < 1e4 else f"{value:.3g} ± {se:.2g}")
    info = row.get("prune")
    seconds = "" if info is None else f"{info['seconds']:.0f}"
    heal = f"{row['heal']['seconds']:.0f}" if "heal" in row else ""
    selection = "" if info is None else _selection(info)
    if info is not None and info.get("derived_from"):
        mark = " ".join(filter(None, [mark, "(selection of the row without comp)"]))
    if info is not None and info.get("prefix_of"):
        mark = " ".join(filter(None, [mark, f"(first steps of the {info['prefix_of']}-block run)"]))
    if info is not None and info.get("recorded"):
        mark = " ".join(filter(None, [mark, "(recorded selection)"]))
    val = f"{validation_score(row):.4f}"
    return "| " + " | ".join([name, val, *ppl, seconds, heal, selection, mark]) + " |"


def _selection(info: dict) -> str:
    windows = [f"{lo}-{hi}" for lo, hi in info["windows"]]
    dropped = [str(b) for b in info.get("dropped") or []]
    return " ".join(windows + ([f"drop {','.join(dropped)}"] if dropped else []))


if __name__ == "__main__":
    main()
