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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slm_fast import baselines, cost
from slm_fast.baselines import LACO_RULE, METHODS
from slm_fast.budget import plan_memory
from slm_fast.checkpoint.locate import load_tokenizer
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.checkpoint.staging import check_output_location, ensure_free_space
from slm_fast.compensate import DEFAULT_RIDGE, check_compensation, fit_linear
from slm_fast.criteria import LOGIT_CRITERIA, check_criterion
from slm_fast.devices import check_device
from slm_fast.errors import InputError
from slm_fast.export import export_merged_checkpoint, output_nbytes
from slm_fast.journal import RunJournal
from slm_fast.merge import check_average_settings, check_rule
from slm_fast.runtime.cache import HiddenStateCache, TieredStore, combined_stats
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import CandidateScorer, SearchResult, best_first_search, search_threshold, sliding_search
from slm_fast.windows import Window, format_windows, output_blocks

REPORT_NAME = "slm_report.json"
THRESHOLD_METHODS = ("slm", "laco")
ONE_PASS_METHODS = ("shortgpt", "gromov", "last-n")  # select from the calibration states, no search
SEARCHES = ("best-first", "sliding")
# What the reference code fixes (slm_reference.md sections 1-3); `--preset reference` applies them all.
# The calibration corpus is not among them: the reference's sampler runs on the corpus chosen.
REFERENCE_PRESET = dict(
    method="slm", criterion="cosine", rule="keep_high_norms_low", n_samples=10, seq_len=128, seed=1234,
    search="sliding", compensate="none",
)  # fmt: skip
# The command-line flag of each option, for error messages.
OPTION_FLAGS = dict(
    method="--method", criterion="--criterion", rule="--rule", n_samples="--samples", seq_len="--seq-len",
    seed="--seed", search="--search", compensate="--compensate",
)  # fmt: skip


@dataclass
class PruneOptions:
    threshold: float | None = None
    remove: int | None = None
    ratio: float | None = None
    preset: str = "default"  # or "reference"
    # The default configuration, SLM best-first + linear compensation, has the lowest mean validation
    # log-perplexity over the quality protocol's table (bench/quality_choice.md; SLEB + compensation ties).
    method: str = "slm"  # or one of the baselines: sleb, shortgpt, gromov, laco, last-n
    search: str = "best-first"  # SLM's window search: best-first, or sliding (the paper's scan)
    laco_merge_layers: int = 2  # LaCo's MERGE_LAYERS: layers folded into the one below per merge
    laco_interval: int = 1  # LaCo's INTERVAL
    criterion: str = "cosine"
    rule: str = "keep_high"
    average_settings: str = "low"  # per-layer settings of a window merged by mean/sum/rdsc: low or high block
    calib: str = "austen:emma"  # shipped with the package; novels, like the reference's BookCorpus; P&P held out
    calib_field: str = "text"  # the text field of .jsonl / .parquet / datasets sources
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    protect_top: int = 1
    protect_bottom: int = 0
    speculate: int = 1
    compensate: str = "linear"  # fit a correction of each pruned span (slm_fast/compensate.py), or "none"
    compensate_ridge: float = DEFAULT_RIDGE
    device: str = "cpu"
    dtype: str | None = None  # compute dtype; None = the checkpoint's (fp16 runs in fp32 on the CPU)
    memory_budget: int | None = None  # bytes for blocks and hidden states; None: from free GPU memory / RAM
    micro_batch: int | None = None  # samples per block call; None: sized from the budget
    work_dir: str | None = None  # the run's work folder; None: .OUT.work next to OUT
    resume: bool = False  # continue the run whose work folder is there
    shard_size: int = 2 * 10**9
    out_dtype: str | None = None  # None keeps the source dtype
    overwrite: bool = False
    progress: bool = True
    # The option names the caller set explicitly (the CLI fills it); None: those that differ from the
    # defaults. Only used to refuse options that --preset reference would override.
    explicit: frozenset[str] | None = None

    @property
    def merge_rule(self) -> str:
        """LaCo merges by its code's effective rule; SLM by the rule chosen."""
        return LACO_RULE if self.method == "laco" else self.rule

    @property
    def scoring_criterion(self) -> str:
        """SLEB ranks removals by calibration perplexity; every other method by `criterion`."""
        return "ppl" if self.method == "sleb" else self.criterion

    @property
    def scorer_settings(self) -> dict:
        """How candidates are built and scored: the CandidateScorer keywords these options decide."""
        return {"criterion": self.scoring_criterion, "rule": self.merge_rule, "average_settings": self.average_settings}

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
        if self.preset == "reference":
            self._check_reference_overrides()
        if self.threshold is not None and self.method not in THRESHOLD_METHODS and self.preset != "reference":
            raise InputError(
                f"--method {self.method} ranks blocks: give --remove or --ratio, not --threshold "
                f"(a threshold needs --method {' or '.join(THRESHOLD_METHODS)})"
            )
        if self.remove is not None and self.remove < 0:
            raise InputError(f"--remove must be >= 0, got {self.remove}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise InputError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.speculate < 1:
            raise InputError(f"--speculate must be >= 1, got {self.speculate}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise InputError(f"--memory-budget must be positive, got {self.memory_budget} bytes")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        if self.n_samples < 1 or self.seq_len < 2:
            raise InputError(f"need --samples >= 1 and --seq-len >= 2, got {self.n_samples} and {self.seq_len}")
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
        check_average_settings(self.average_settings)
        check_device(self.device)
        return self

    def _check_reference_overrides(self) -> None:
        """--preset reference fixes REFERENCE_PRESET's options: refuse any given with another value."""
        defaults = PruneOptions()
        given = self.explicit
        if given is None:
            given = {name for name in REFERENCE_PRESET if getattr(self, name) != getattr(defaults, name)}
        conflicts = [
            f"{OPTION_FLAGS[name]} {getattr(self, name)}"
            for name in REFERENCE_PRESET
            if name in given and getattr(self, name) != REFERENCE_PRESET[name]
        ]
        if conflicts:
            fixed = ", ".join(f"{OPTION_FLAGS[k]} {v}" for k, v in REFERENCE_PRESET.items())
            raise InputError(
                f"--preset reference fixes {fixed}; it would override {', '.join(conflicts)}: "
                "drop them, or leave out --preset reference"
            )

    def max_removable(self, num_blocks: int) -> int:
        """The most blocks this method can remove from `num_blocks` given the protected blocks: SLM
        merges only the unprotected blocks (a window of m of them removes m - 1), and the reference
        never merges its top block nor starts a window at block 0; SLEB never removes the first or the
        last block; the other baselines keep one block."""
        if self.method == "sleb":
            return max(0, num_blocks - 2)
        if self.method != "slm":
            return num_blocks - 1
        if self.preset == "reference":
            return max(0, num_blocks - 3)
        return max(0, num_blocks - self.protect_top - self.protect_bottom - 1)


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
    """Prune `source` (a checkpoint folder or a cached Hub id) into `output`. Every check that can
    fail (options, checkpoint, target, disk space) runs before calibration.

    Under torchrun (a default process group of several ranks) every rank calls this with the same
    arguments and the run is a pipeline over blocks (slm_fast/parallel/prune_pipeline.py)."""
    from slm_fast.parallel.team import Team

    team = Team.current()
    if team is not None:
        from slm_fast.parallel.prune_pipeline import prune_pipeline

        return prune_pipeline(source, output, options, team)
    started = time.perf_counter()
    options = _resolved(options)
    reader = CheckpointReader(source)
    output = Path(output)
    check_output_location(reader.folder, output, overwrite=options.overwrite)
    removed = _check_target(reader, options)
    out_dtype = None if options.out_dtype is None else getattr(torch, options.out_dtype)
    ensure_free_space(output, output_nbytes(reader, removed, out_dtype))
    journal = RunJournal(
        work_folder(reader.folder, output, options),
        _fingerprint(options),
        resume=options.resume,
        overwrite=options.overwrite,
    )
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    input_ids = journal.calibration_ids()
    if input_ids is None:
        input_ids = calibration_ids(reader.folder, options)
        journal.save_calibration_ids(input_ids)
    runner, cache, plan_states, layout = _runtime(reader, options, input_ids.shape[0], spill_dir=journal.states_dir)
    _log(options, layout.describe())
    rates = cost.measure_rates(reader, runner, layout, options.seq_len, journal.states_dir)
    predicted = _predict(reader, options, layout, rates, runner.dtype)
    timings["setup"] = time.perf_counter() - tick  # calibration tokens, model parts, rates
    tick = time.perf_counter()
    try:
        reference = calibrate(runner, input_ids, cache, progress=options.progress)
        journal.check_reference(reference)
        timings["calibrate"] = time.perf_counter() - tick

        tick = time.perf_counter()
        bar = tqdm(desc="candidates", unit="cand", disable=not options.progress)
        scorer = CandidateScorer(
            runner,
            cache,
            reference,
            **options.scorer_settings,
            on_evaluated=bar.update,
            on_scored=journal.record,
            states=plan_states,
            input_ids=input_ids,
        )
        scorer.scores, scorer.plan_scores = journal.scores()
        if journal.resumed:
            _log(options, f"resuming {journal.folder}: {len(scorer.scores) + len(scorer.plan_scores)} scores recorded")
        selection = _select(scorer, LocalBoundaries(cache), reader, options, on_step=journal.record_progress)
        bar.close()
        timings["search"] = time.perf_counter() - tick
        state_stats = combined_stats(cache.store.ledger, plan_states.ledger)
        # calibration and search (the head's tokens are the search's logit criteria); the compensation's apart
        counted = _runner_counts(runner) | {"head_tokens": runner.head_tokens}
        compensation = compensation_work = None
        if options.compensate == "linear":
            tick = time.perf_counter()
            compensation = fit_compensation(runner, cache, options, selection)
            timings["compensate"] = time.perf_counter() - tick
            compensation_work = {k: v - counted[k] for k, v in _runner_counts(runner).items()}
    finally:
        cache.close()
        plan_states.close()
        runner.close()
        journal.close()

    report = _report_json(reader, options, input_ids, selection, scorer)
    report["timings_s"] = timings
    report["compute_dtype"] = str(runner.dtype).removeprefix("torch.")
    report["device"] = str(runner.device)
    report["memory"] = layout.to_json()
    report["resumed"] = journal.resumed
    report["cost"] = _cost_report(
        reader, options, layout, rates, runner, counted, scorer, state_stats, timings, predicted, selection,
        compensation_work,
    )  # fmt: skip
    if compensation is not None:
        report["compensation"] = compensation.to_json() | {"work": compensation_work}
    report_out = write_output(reader, output, options, selection, report, timings, compensation)
    journal.remove()
    return dataclasses.replace(report_out, seconds=time.perf_counter() - started)


def fit_compensation(runner: BlockRunner, cache: HiddenStateCache, options: PruneOptions, selection: Selection):
    """--compensate linear: the correction of every pruned span of `selection`, fitted on the calibration
    states in `cache` (slm_fast/compensate.py)."""
    plan = output_blocks(selection.windows, runner.num_blocks, selection.dropped)
    return fit_linear(
        runner,
        cache,
        plan,
        rule=selection.rule,
        average_settings=options.average_settings,
        ridge=options.compensate_ridge,
        progress=options.progress,
    )


def write_output(
    reader: CheckpointReader,
    output: Path,
    options: PruneOptions,
    selection: Selection,
    report: dict,
    timings: dict[str, float],
    compensation=None,
) -> PruneReport:
    """Write the pruned checkpoint with `report` as slm_report.json (atomically: a temporary folder
    renamed), then add the write's own figures to the report; the run's PruneReport (seconds 0)."""
    out_dtype = None if options.out_dtype is None else getattr(torch, options.out_dtype)
    tick = time.perf_counter()
    exported = export_merged_checkpoint(
        reader,
        output,
        selection.windows,
        dropped=selection.dropped,
        rule=selection.rule,
        average_settings=options.average_settings,
        dtype=out_dtype,
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
        seconds=0.0,
    )


def estimate(source: str | Path, options: PruneOptions) -> str:
    """`--dry-run`: the cost model's figures for this run (block loads, bytes, FLOPs, peak memory per
    tier, seconds from rates measured here), without calibrating, searching or writing anything."""
    options = _resolved(options)
    if not _modelled(options):
        raise InputError(
            "--dry-run models a run to a block count (--remove or --ratio) by --method slm with --search "
            "best-first, sleb, shortgpt, gromov or last-n"
        )
    reader = CheckpointReader(source)
    runner, _, _, layout = _runtime(reader, options, options.n_samples, spill_dir=None)
    try:
        rates = cost.measure_rates(reader, runner, layout, options.seq_len, None)
        figures = _predict(reader, options, layout, rates, runner.dtype)
    finally:
        runner.close()
    rates_line = (
        f"rates measured here: read {rates.read_bytes_per_s / 1e9:.2f} GB/s, "
        f"{rates.token_forwards_per_s:,.0f} token-blocks/s, spill write {rates.disk_write_bytes_per_s / 1e9:.2f} GB/s, "
        f"read {rates.disk_read_bytes_per_s / 1e9:.2f} GB/s"
    )
    head = (
        f"dry run: {reader.num_blocks} blocks, remove {_target_blocks(reader, options)}, calibration "
        f"{options.n_samples} x {options.seq_len} tokens, compute dtype {str(runner.dtype).removeprefix('torch.')} "
        f"on {runner.device}"
    )
    return "\n".join([head, cost.describe(figures, layout), rates_line])


def work_folder(source: Path, output: Path, options: PruneOptions) -> Path:
    """Where the run keeps its progress (removed when it completes): --work-dir, or .OUT.work beside OUT."""
    folder = Path(options.work_dir) if options.work_dir else output.parent / f".{output.name}.work"
    resolved, source = folder.resolve(), source.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise InputError(f"--work-dir {folder} overlaps the source checkpoint {source}; choose another folder")
    return folder


def _resolved(options: PruneOptions) -> PruneOptions:
    """Validated options with the reference preset applied (validation first: it refuses options the
    preset would silently override)."""
    options = options.validated()
    if options.preset == "reference":
        options = dataclasses.replace(options, **REFERENCE_PRESET)
    return options


def _fingerprint(options: PruneOptions) -> dict:
    """The options that decide a run's scores and decisions (what a resumed run must share)."""
    keep = ("threshold", "remove", "ratio", "preset", "method", "search", "laco_merge_layers", "laco_interval")
    keep += ("criterion", "rule", "average_settings", "calib", "calib_field", "n_samples", "seq_len", "seed")
    keep += ("protect_top", "protect_bottom")
    keep += ("speculate", "dtype")
    return {k: getattr(options, k) for k in keep}


def _log(options: PruneOptions, message: str) -> None:
    if options.progress:
        print(message, file=sys.stderr, flush=True)


def _predict(reader, options, layout, rates, dtype) -> dict | None:
    """The cost model's a-priori figures for a run to a block count by a method it models (SLM's
    best-first, SLEB's loop, the one-pass baselines), with the compensation sweep's on the selection the
    model assumes when --compensate linear; None for the searches it does not model."""
    if not _modelled(options):
        return None
    replay = _replay(reader, options, layout, dtype)
    target, num_blocks = _target_blocks(reader, options), reader.num_blocks
    if options.method == "slm":
        lowest, highest = options.protect_bottom, num_blocks - 1 - options.protect_top
        steps = list(cost.predicted_steps(num_blocks, target, lowest, highest))
        assumed = output_blocks(steps[-1][1] if steps else [], num_blocks)
    elif options.method == "sleb":
        steps = list(cost.predicted_sleb_steps(num_blocks, target))
        assumed = output_blocks([], num_blocks, steps[-1][1] if steps else [])
    else:  # ShortGPT, Gromov, last-n: the selection from the calibration states, then its one score
        replay.read_boundaries(baselines.boundary_reads(options.method, num_blocks, target))
        assumed = output_blocks([], num_blocks, baselines.last_n_blocks(num_blocks, target))
        steps = [([tuple(assumed)], None)] if target else []
    for plans, _ in steps:
        replay.sweep(plans)
    extra = {}
    if options.compensate == "linear":
        extra["compensation"] = cost.summarize_compensation(replay.compensation(assumed), rates)
    return cost.summarize(replay.finish(), rates, reader, options.seq_len, dtype) | extra


def _modelled(options: PruneOptions) -> bool:
    """Whether the cost model predicts this run: a block count (not a threshold) and a method whose
    search it replays: SLM's best-first, SLEB's loop, or a one-pass baseline (ShortGPT, Gromov, last-n:
    their selection assumed to be the blocks last-n drops, which moves only the one score's cost)."""
    if options.threshold is not None:
        return False
    return options.method in ("sleb", *ONE_PASS_METHODS) or (options.method == "slm" and options.search == "best-first")


def _replay(reader, options, layout, dtype) -> cost.Replay:
    head_tokens = cost.head_tokens_per_plan(options.scoring_criterion, options.n_samples, options.seq_len)
    return cost.Replay(reader, layout, options.n_samples, options.seq_len, dtype, options.merge_rule, head_tokens)


def _runner_counts(runner: BlockRunner) -> dict[str, int]:
    """What the runner has counted so far: blocks built from the checkpoint, bytes read, token forwards."""
    counts = (runner.blocks_loaded, runner.bytes_read, runner.token_forwards)
    return dict(zip(("block_loads", "bytes_read", "token_forwards"), counts, strict=True))


def _cost_report(
    reader, options, layout, rates, runner, counted, scorer, state_stats, timings, predicted, selection,
    compensation_work,
) -> dict:  # fmt: skip
    """Predicted beside measured: the a-priori prediction (assumed steps), the same model replayed on the
    sweeps the run made, and what was counted (`counted`: the runner's counts when the search ended) and
    timed in calibration and search; the compensation sweep's likewise under "compensation" (replayed on
    the run's `selection`, against `compensation_work`: the runner's counts during the fit)."""
    replay = _replay(reader, options, layout, runner.dtype)
    if options.method in ONE_PASS_METHODS:  # their selection's reads of the calibration states
        count = _target_blocks(reader, options)
        replay.read_boundaries(baselines.boundary_reads(options.method, reader.num_blocks, count))
    for plans in scorer.sweeps:
        replay.sweep(plans)
    compensation = None
    if compensation_work is not None:
        plan = output_blocks(selection.windows, reader.num_blocks, selection.dropped)
        compensation = _compensation_cost(replay.compensation(plan), rates, compensation_work, timings, predicted)
    replayed = cost.summarize(replay.finish(), rates, reader, options.seq_len, runner.dtype)
    params = cost.block_param_bytes(reader, 0, runner.dtype) // runner.dtype.itemsize
    config = reader.config.get("text_config", reader.config)
    measured = {
        **counted,
        "forward_flops": counted["token_forwards"] * cost.flops_per_token(config, options.seq_len, params),
        "head_flops": counted["head_tokens"] * cost.head_flops_per_token(config),
        "state_bytes_written": state_stats["disk_bytes_written"],
        "state_bytes_read": state_stats["disk_bytes_read"],
        "peak_state_bytes": state_stats["peak_bytes"],
        "seconds": timings["calibrate"] + timings["search"],
    }
    scalar = [k for k in measured if k != "peak_state_bytes"]
    out = {"rates": rates.to_json(), "measured": measured, "replayed": replayed}
    out["replayed_over_measured"] = {k: cost.within(replayed[k], measured[k]) for k in scalar}
    if predicted is not None:
        out["predicted"] = predicted
        out["predicted_over_measured"] = {k: cost.within(predicted[k], measured[k]) for k in scalar}
    if compensation is not None:
        out["compensation"] = compensation
    return out


def _compensation_cost(work: cost.Counts, rates, counted: dict, timings: dict, predicted: dict | None) -> dict:
    """The compensation sweep replayed on the run's selection beside what the runner counted and the
    compensate seconds; the a-priori figures too when the prediction modelled it."""
    replayed = cost.summarize_compensation(work, rates)
    measured = {**counted, "seconds": timings["compensate"]}
    out = {"measured": measured, "replayed": replayed}
    out["replayed_over_measured"] = {k: cost.within(replayed[k], measured[k]) for k in measured}
    if predicted is not None and "compensation" in predicted:
        assumed = predicted["compensation"]
        out["predicted_over_measured"] = {k: cost.within(assumed[k], measured[k]) for k in measured}
    return out


def calibration_ids(folder: Path, options: PruneOptions) -> torch.Tensor:
    """The calibration tokens: packed from the corpus (see pack_calibration), or under
    `--preset reference` drawn as the reference draws them (sample_calibration)."""
    from slm_fast.data import load_corpus, pack_calibration, sample_calibration

    tokenizer = load_tokenizer(folder)
    corpus = load_corpus(options.calib, field=options.calib_field)
    sampler = sample_calibration if options.preset == "reference" else pack_calibration
    return sampler(tokenizer, corpus, options.n_samples, options.seq_len, options.seed)


def _check_target(reader: CheckpointReader, options: PruneOptions) -> int:
    """The number of blocks the target removes (0 for a threshold: the output may keep every block);
    InputError when the model cannot meet it."""
    if options.threshold is not None:
        return 0
    target = _target_blocks(reader, options)
    limit = options.max_removable(reader.num_blocks)
    if target > limit:
        asked = (
            f"--remove {options.remove}" if options.remove is not None else f"--ratio {options.ratio} ({target} blocks)"
        )
        protected = " (SLEB never removes the first or the last block)" if options.method == "sleb" else ""
        if options.method == "slm":
            protected = (
                " (the reference never merges the top block nor starts a window at block 0)"
                if options.preset == "reference"
                else f" with --protect-top {options.protect_top} and --protect-bottom {options.protect_bottom}"
            )
        raise InputError(
            f"{asked}: {options.method} can remove at most {limit} of the {reader.num_blocks} blocks{protected}"
        )
    return target


def _runtime(reader: CheckpointReader, options: PruneOptions, n_samples: int, spill_dir: Path | None):
    """The block runner, the boundary cache and the store of the search's plan states, sized by the run's
    memory layout."""
    dtype = None if options.dtype is None else getattr(torch, options.dtype)
    runner = BlockRunner(reader, options.device, dtype)
    budget = options.memory_budget
    layout = plan_memory(reader, n_samples, options.seq_len, runner.dtype, runner.device, budget)
    if options.micro_batch is not None:
        layout = dataclasses.replace(layout, micro_batch=options.micro_batch)
    runner.micro_batch = layout.micro_batch
    runner.block_budget_bytes = layout.block_bytes
    boundaries = TieredStore(
        runner.device,
        layout.state_device_bytes - layout.plan_device_bytes,
        layout.state_host_bytes - layout.plan_host_bytes,
        spill_dir=spill_dir,
    )
    plan_states = TieredStore(runner.device, layout.plan_device_bytes, layout.plan_host_bytes, spill_dir=spill_dir)
    return runner, HiddenStateCache(store=boundaries), plan_states, layout


@dataclass
class Selection:
    """What a method decided: windows to merge (by `rule`) and blocks to drop, and why."""

    windows: list[Window]
    dropped: list[int]
    rule: str
    similarity: float | None
    details: dict


class LocalBoundaries:
    """The boundary-reading baselines' scores from a cache holding every boundary (one process)."""

    def __init__(self, cache: HiddenStateCache):
        self.cache = cache

    def block_influence(self, num_blocks: int) -> list[float]:
        return baselines.shortgpt_scores(self.cache, num_blocks)

    def angular_distances(self, num_blocks: int, n: int) -> list[float]:
        return baselines.gromov_distances(self.cache, num_blocks, n)


def _select(
    scorer: CandidateScorer, boundaries, reader: CheckpointReader, options: PruneOptions, on_step=None
) -> Selection:
    """Run the method. `boundaries` scores the baselines that read boundary states (LocalBoundaries,
    or parallel.boundaries.PipelineBoundaries when the states are spread over ranks)."""
    if options.method == "slm" and options.search == "best-first":
        search = best_first_search(
            scorer,
            reader.num_blocks,
            target_blocks=None if options.threshold is not None else _target_blocks(reader, options),
            threshold=options.threshold,
            protect_top=options.protect_top,
            protect_bottom=options.protect_bottom,
            on_step=on_step,
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
        scores = boundaries.block_influence(reader.num_blocks)
        dropped, details = baselines.shortgpt_blocks(scores, count), {"block_influence": scores}
    elif options.method == "gromov":
        distances = boundaries.angular_distances(reader.num_blocks, count)
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
        "options": asdict(options) | {"explicit": None if options.explicit is None else sorted(options.explicit)},
        "windows": [list(w) for w in sorted(selection.windows)],
        "dropped": selection.dropped,
        "rule": selection.rule,
        "similarity": selection.similarity,
        **selection.details,
        "calibration": {
            "corpus": options.calib,
            "sampling": "reference (random windows of whole documents)"
            if options.preset == "reference"
            else "packed (shuffled documents joined by EOS, cut into samples)",
            "n_samples": options.n_samples,
            "seq_len": options.seq_len,
            "seed": options.seed,
            "token_ids": input_ids.tolist(),
        },
        "forward_passes": scorer.forward_passes,
        "blocks_loaded": scorer.runner.blocks_loaded,
    }
