"""`slm-fast prune`: calibrate block by block, search the windows, write the pruned checkpoint.

Composes the runtime (block-streamed forward passes and the hidden-state cache), the sliding-window
search and the streaming export; writes `slm_report.json` into the output with every decision and
what is needed to audit or repeat the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slm_fast import baselines
from slm_fast.baselines import LACO_RULE, METHODS
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.checkpoint.staging import check_output_location
from slm_fast.compensate import DEFAULT_RIDGE, check_compensation, fit_linear
from slm_fast.criteria import LOGIT_CRITERIA, check_criterion
from slm_fast.errors import InputError
from slm_fast.export import export_merged_checkpoint
from slm_fast.merge import check_rule
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import CandidateScorer, SearchResult, best_first_search, search_threshold, sliding_search
from slm_fast.windows import Window, format_windows, output_blocks

REPORT_NAME = "slm_report.json"
THRESHOLD_METHODS = ("slm", "laco")
SEARCHES = ("best-first", "sliding")
# What the reference code fixes (slm_reference.md sections 1-3); `--preset reference` applies them all.
REFERENCE_PRESET = dict(
    criterion="cosine", rule="keep_high_norms_low", n_samples=10, seq_len=128, seed=1234, search="sliding"
)


@dataclass
class PruneOptions:
    threshold: float | None = None
    remove: int | None = None
    ratio: float | None = None
    preset: str = "default"  # or "reference"
    method: str = "slm"  # or one of the baselines: shortgpt, gromov, laco, last-n
    search: str = "best-first"  # SLM's window search: best-first, or sliding (the paper's scan)
    laco_merge_layers: int = 2  # LaCo's MERGE_LAYERS: layers folded into the one below per merge
    laco_interval: int = 1  # LaCo's INTERVAL
    criterion: str = "cosine"
    rule: str = "keep_high"
    calib: str = "austen:emma"  # novels, like the reference's BookCorpus; P&P stays held out
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    protect_top: int = 1
    protect_bottom: int = 0
    speculate: int = 1
    compensate: str = "none"  # or "linear": fit a correction of each pruned span (slm_fast/compensate.py)
    compensate_ridge: float = DEFAULT_RIDGE
    device: str = "cpu"
    dtype: str | None = None  # compute dtype; None = the checkpoint's (fp16 runs in fp32 on the CPU)
    memory_budget: int = 8 * 10**9  # bytes for resident blocks plus cached hidden states
    shard_size: int = 2 * 10**9
    out_dtype: str | None = None  # None keeps the source dtype
    overwrite: bool = False
    progress: bool = True

    @property
    def merge_rule(self) -> str:
        """LaCo merges by its code's effective rule; SLM by the rule chosen."""
        return LACO_RULE if self.method == "laco" else self.rule

    @property
    def scoring_criterion(self) -> str:
        """SLEB ranks removals by calibration perplexity; every other method by `criterion`."""
        return "ppl" if self.method == "sleb" else self.criterion

    def validated(self) -> PruneOptions:
        targets = [t for t in (self.threshold, self.remove, self.ratio) if t is not None]
        if len(targets) != 1:
            raise InputError("give exactly one of --threshold, --remove and --ratio")
        if self.preset not in ("default", "reference"):
            raise InputError(f"unknown preset {self.preset!r}; choose default or reference")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.search not in SEARCHES:
            raise InputError(f"unknown search {self.search!r}; choose one of: {', '.join(SEARCHES)}")
        if self.preset == "reference" and self.method != "slm":
            raise InputError(f"--preset reference applies to --method slm, not {self.method}")
        if self.threshold is not None and self.method not in THRESHOLD_METHODS:
            raise InputError(f"--method {self.method} ranks blocks: give --remove or --ratio, not --threshold")
        if self.remove is not None and self.remove < 0:
            raise InputError(f"--remove must be >= 0, got {self.remove}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise InputError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.speculate < 1:
            raise InputError(f"--speculate must be >= 1, got {self.speculate}")
        check_criterion(self.criterion)
        check_rule(self.rule)
        scanned = self.method == "laco" or (self.method == "slm" and self.search == "sliding")
        if scanned and self.threshold is None and self.criterion in LOGIT_CRITERIA:
            raise InputError(
                f"--criterion {self.criterion} scores are minus nats (<= 0), outside the [0, 1] range the "
                "threshold search spans: give --threshold, or use --search best-first"
            )
        check_compensation(self.compensate)
        if self.compensate_ridge < 0:
            raise InputError(f"--compensate-ridge must be >= 0, got {self.compensate_ridge}")
        return self


@dataclass
class PruneReport:
    output: Path
    method: str
    windows: list[Window]
    dropped: list[int]
    blocks_before: int
    blocks_after: int
    parameters_before: int
    parameters_after: int
    similarity: float | None
    seconds: float

    def summary(self) -> str:
        similarity = "n/a (nothing removed)" if self.similarity is None else f"{self.similarity:.4f}"
        removed = f"windows {format_windows(self.windows)}"
        if self.dropped:
            removed += f", dropped blocks {', '.join(map(str, self.dropped))}"
        return (
            f"{self.method}: pruned {self.blocks_before} -> {self.blocks_after} blocks, {removed}; "
            f"parameters {self.parameters_before / 1e6:,.1f}M -> {self.parameters_after / 1e6:,.1f}M "
            f"({1 - self.parameters_after / self.parameters_before:.1%} fewer); similarity {similarity}; "
            f"{self.seconds:.1f} s; wrote {self.output}"
        )


def prune(source: str | Path, output: str | Path, options: PruneOptions) -> PruneReport:
    started = time.perf_counter()
    if options.preset == "reference":
        options = dataclasses.replace(options, **REFERENCE_PRESET)
    options.validated()
    reader = CheckpointReader(source)
    output = Path(output)
    check_output_location(reader.folder, output, overwrite=options.overwrite)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    input_ids = calibration_ids(reader.folder, options)
    runner, cache = _runtime(reader, options, input_ids)
    try:
        reference = calibrate(runner, input_ids, cache, progress=options.progress)
        timings["calibrate"] = time.perf_counter() - tick

        tick = time.perf_counter()
        bar = tqdm(desc="candidates", unit="cand", disable=not options.progress)
        scorer = CandidateScorer(
            runner,
            cache,
            reference,
            criterion=options.scoring_criterion,
            rule=options.merge_rule,
            on_evaluated=bar.update,
            input_ids=input_ids,
        )
        selection = _select(scorer, cache, reader, options)
        bar.close()
        timings["search"] = time.perf_counter() - tick
        compensation = None
        if options.compensate == "linear":
            tick = time.perf_counter()
            plan = output_blocks(selection.windows, reader.num_blocks, selection.dropped)
            compensation = fit_linear(
                runner, cache, plan, rule=selection.rule, ridge=options.compensate_ridge, progress=options.progress
            )
            timings["compensate"] = time.perf_counter() - tick
    finally:
        cache.close()

    report = _report_json(reader, options, input_ids, selection, scorer)
    report["timings_s"] = timings
    if compensation is not None:
        report["compensation"] = compensation.to_json()
    tick = time.perf_counter()
    exported = export_merged_checkpoint(
        reader,
        output,
        selection.windows,
        dropped=selection.dropped,
        rule=selection.rule,
        dtype=None if options.out_dtype is None else getattr(torch, options.out_dtype),
        max_shard_bytes=options.shard_size,
        overwrite=options.overwrite,
        progress=options.progress,
        provenance={
            "report": REPORT_NAME,
            "method": options.method,
            "criterion": options.criterion,
            "compensate": options.compensate,
        },
        extra_files={REPORT_NAME: json.dumps(report, indent=1) + "\n"},
        block_transform=None if compensation is None else compensation.fold,
    )
    # The write's own figures are known only now: the report is replaced atomically with them added.
    timings["write"] = time.perf_counter() - tick
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["parameters"] = {"before": exported.parameters_before, "after": exported.parameters_after}
    partial = exported.output / f".{REPORT_NAME}.partial"
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(exported.output / REPORT_NAME)
    return PruneReport(
        output=exported.output,
        method=options.method,
        windows=sorted(selection.windows),
        dropped=selection.dropped,
        blocks_before=reader.num_blocks,
        blocks_after=len(exported.block_sources),
        parameters_before=exported.parameters_before,
        parameters_after=exported.parameters_after,
        similarity=selection.similarity,
        seconds=time.perf_counter() - started,
    )


def calibration_ids(folder: Path, options: PruneOptions) -> torch.Tensor:
    from transformers import AutoTokenizer

    from slm_fast.data import load_corpus, sample_calibration

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = load_corpus(options.calib)
    return sample_calibration(tokenizer, corpus, options.n_samples, options.seq_len, options.seed)


def _runtime(reader: CheckpointReader, options: PruneOptions, input_ids: torch.Tensor):
    dtype = None if options.dtype is None else getattr(torch, options.dtype)
    runner = BlockRunner(reader, options.device, dtype)
    hidden_bytes = (reader.num_blocks + 1) * input_ids.numel() * reader.config["hidden_size"] * runner.dtype.itemsize
    on_gpu = runner.device.type == "cuda"
    cache = HiddenStateCache(
        runner.device,
        device_budget_bytes=options.memory_budget // 2 if on_gpu else 0,
        host_budget_bytes=options.memory_budget // 2,
    )
    runner.block_budget_bytes = max(0, options.memory_budget - min(hidden_bytes, options.memory_budget // 2))
    return runner, cache


@dataclass
class Selection:
    """What a method decided: windows to merge (by `rule`) and blocks to drop, and why."""

    windows: list[Window]
    dropped: list[int]
    rule: str
    similarity: float | None
    details: dict


def _select(scorer: CandidateScorer, cache, reader: CheckpointReader, options: PruneOptions) -> Selection:
    if options.method == "slm" and options.search == "best-first":
        search = best_first_search(
            scorer,
            reader.num_blocks,
            target_blocks=None if options.threshold is not None else _target_blocks(reader, options),
            threshold=options.threshold,
            protect_top=options.protect_top,
            protect_bottom=options.protect_bottom,
        )
        return Selection(search.windows, [], options.rule, search.similarity, {"search": search.to_json()})
    if options.method in THRESHOLD_METHODS:
        search, log = _threshold_search(scorer, reader, options)
        details = {"threshold_search": log, "search": search.to_json()}
        return Selection(search.windows, [], options.merge_rule, search.similarity, details)
    count = _target_blocks(reader, options)
    if options.method == "sleb":
        search = baselines.sleb_search(scorer, reader.num_blocks, count)
        dropped = sorted(lo for lo, _ in search.windows)
        details = {"sleb": search.to_json() | {"removal_order": [lo for lo, _ in search.windows]}}
        return Selection([], dropped, options.rule, search.similarity, details | {"target_blocks": count})
    if options.method == "shortgpt":
        scores = baselines.shortgpt_scores(cache, reader.num_blocks)
        dropped, details = baselines.shortgpt_blocks(scores, count), {"block_influence": scores}
    elif options.method == "gromov":
        distances = baselines.gromov_distances(cache, reader.num_blocks, count)
        dropped, details = baselines.gromov_blocks(distances, count), {"angular_distance": distances}
    else:
        dropped, details = baselines.last_n_blocks(reader.num_blocks, count), {}
    plan = output_blocks([], reader.num_blocks, dropped)
    similarity = scorer.score_plans([plan])[0] if dropped else None
    return Selection([], dropped, options.rule, similarity, details | {"target_blocks": count})


def _threshold_search(scorer: CandidateScorer, reader: CheckpointReader, options: PruneOptions):
    parity = options.preset == "reference"

    def run(threshold: float) -> SearchResult:
        if options.method == "laco":
            return baselines.laco_search(
                scorer,
                reader.num_blocks,
                threshold,
                merge_layers=options.laco_merge_layers,
                interval=options.laco_interval,
            )
        return sliding_search(
            scorer,
            reader.num_blocks,
            threshold,
            parity=parity,
            protect_top=1 if parity else options.protect_top,
            protect_bottom=options.protect_bottom,
            speculate=options.speculate,
        )

    if options.threshold is not None:
        return run(options.threshold), {"mode": "threshold", "tried": [[options.threshold, None]]}
    target = _target_blocks(reader, options)
    outcome = search_threshold(run, target)
    log = {
        "mode": "remove" if options.remove is not None else "ratio",
        "target_blocks": target,
        "exact": outcome.exact,
        "reason": outcome.reason,
        "tried": [list(t) for t in outcome.tried],
    }
    if options.ratio is not None:
        log["target_ratio"] = options.ratio
    return outcome.result, log


def _target_blocks(reader: CheckpointReader, options: PruneOptions) -> int:
    if options.remove is not None:
        return options.remove
    total = sum(math.prod(loc.entry.shape) for loc in reader.locations.values())
    per_block = sum(math.prod(reader.entry(reader.full_name(0, n)).shape) for n in reader.block_tensor_names(0))
    return baselines.blocks_for_ratio(total, per_block, options.ratio)


def _report_json(reader, options, input_ids, selection: Selection, scorer: CandidateScorer) -> dict:
    return {
        "source": str(reader.folder.resolve()),
        "method": options.method,
        "options": asdict(options),
        "windows": [list(w) for w in sorted(selection.windows)],
        "dropped": selection.dropped,
        "rule": selection.rule,
        "similarity": selection.similarity,
        **selection.details,
        "calibration": {
            "corpus": options.calib,
            "n_samples": options.n_samples,
            "seq_len": options.seq_len,
            "seed": options.seed,
            "token_ids": input_ids.tolist(),
        },
        "forward_passes": scorer.forward_passes,
        "blocks_loaded": scorer.runner.blocks_loaded,
    }
