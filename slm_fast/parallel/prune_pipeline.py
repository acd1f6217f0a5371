"""`slm-fast prune` on several ranks (torchrun): a pipeline over blocks.

Every rank runs this with the same arguments. Each rank owns a contiguous slice of the blocks, sized
from its memory for resident blocks (parallel/pipeline.py); the calibration and every search sweep
flow through the ranks as hidden states sent point to point, and the last rank scores the candidates
and broadcasts the scores (parallel/scorer.py), so every rank takes the same decisions. A model that
fits the ranks' memory together is read from disk once, in the calibration.

Rank 0 alone owns the files: it reads the calibration text, keeps the run journal (work folder) and
shares with the other ranks what they need from it (token ids, recorded scores on --resume: no shared
filesystem is needed across hosts), and writes the output and its report. Checks that can fail on one
rank fail the run on every rank before any work (Team.checks).

--compensate linear runs on rank 0 alone after the search: its fit walks the pruned model bottom-up
over the original states at every pruned span's ends, which the pipeline spreads over the ranks, so
rank 0 calibrates again as one process (the model read once more) and fits as `prune` does on one
process, while the other ranks wait for its outcome. Not distributed: the cost model's figures (`cost`
in the one-process report), which model one process.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slm_fast.budget import block_param_bytes, default_budget
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.checkpoint.staging import check_output_location, ensure_free_space
from slm_fast.errors import InputError, SlmFastError
from slm_fast.export import output_nbytes
from slm_fast.journal import RunJournal, reference_digest
from slm_fast.parallel.boundaries import PipelineBoundaries
from slm_fast.parallel.pipeline import Clock, Link, Slices, Traffic, calibrate_slice, search_work
from slm_fast.parallel.scorer import PipelineScorer
from slm_fast.parallel.team import Team
from slm_fast.prune import (
    PruneOptions,
    PruneReport,
    _check_target,
    _fingerprint,
    _log,
    _report_json,
    _resolved,
    _runtime,
    _select,
    calibration_ids,
    fit_compensation,
    work_folder,
    write_output,
)
from slm_fast.runtime.stream import calibrate

# Default chunks per rank: with C chunks in flight on W ranks a sweep keeps the ranks busy about
# C / (C + W - 1) of the time, 2W chunks about 2/3 or more (a memory-sized micro-batch is often all
# the samples: one chunk, and the ranks would take turns).
CHUNKS_PER_RANK = 2


def prune_pipeline(source: str | Path, output: str | Path, options: PruneOptions, team: Team) -> PruneReport:
    started = time.perf_counter()
    output = Path(output)
    journal = input_ids = recorded = None
    with team.checks():
        options = _distributed_options(_resolved(options), team)
        reader = CheckpointReader(source)
        removed = _check_target(reader, options)
        if reader.num_blocks < team.size:
            raise InputError(f"{reader.folder}: {reader.num_blocks} blocks cannot be shared by {team.size} ranks")
        if team.is_main:
            check_output_location(reader.folder, output, overwrite=options.overwrite)
            out_dtype = None if options.out_dtype is None else getattr(torch, options.out_dtype)
            ensure_free_space(output, output_nbytes(reader, removed, out_dtype))
    with team.checks():  # the work folder only once every rank accepted its input
        if team.is_main:
            journal = RunJournal(
                work_folder(reader.folder, output, options),
                _fingerprint(options),
                resume=options.resume,
                overwrite=options.overwrite,
            )
            input_ids = journal.calibration_ids()
            if input_ids is None:
                input_ids = calibration_ids(reader.folder, options)
                journal.save_calibration_ids(input_ids)
            recorded = journal.scores()
    main = team.is_main
    progress = options.progress and main
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    input_ids = team.share(input_ids)
    recorded = team.share(recorded)
    runner, cache, plan_states, layout, slices, chunk_major = _pipeline_runtime(
        reader, options, input_ids.shape[0], team, journal.states_dir if main else None
    )
    if progress:
        _log(options, f"pipeline over {team.size} ranks, blocks {slices.to_json()}; rank 0: {layout.describe()}")
    timings["setup"] = time.perf_counter() - tick
    traffic, calibration_clock, clock = Traffic(), Clock(), Clock()
    try:
        tick = time.perf_counter()
        calibration_clock.start()
        link = Link(team.rank, cache.store, calibration_clock, traffic)
        reference = calibrate_slice(
            runner,
            input_ids,
            cache,
            slices,
            team.rank,
            link,
            chunk_major=chunk_major[team.rank],
            keep_output=options.method == "shortgpt",
            progress=progress,
        )
        calibration_clock.stop()
        digest = team.share(reference_digest(reference) if reference is not None else None, src=team.last)
        with team.checks():
            if main:
                journal.check_reference_digest(digest)
        timings["calibrate"] = time.perf_counter() - tick
        calibration_bytes = traffic.states

        tick = time.perf_counter()
        clock.start()
        bar = tqdm(desc="candidates", unit="cand", disable=not progress)
        scorer = PipelineScorer(
            runner,
            cache,
            reference,
            **options.scorer_settings,
            on_evaluated=bar.update,
            on_scored=journal.record if main else None,
            states=plan_states,
            input_ids=input_ids,
            slices=slices,
            rank=team.rank,
            clock=clock,
            traffic=traffic,
            chunk_major=chunk_major,
        )
        scorer.scores, scorer.plan_scores = recorded
        if options.resume and progress:
            _log(options, f"resuming {journal.folder}: {len(scorer.scores) + len(scorer.plan_scores)} scores recorded")
        boundaries = PipelineBoundaries(cache, slices, team)
        selection = _select(scorer, boundaries, reader, options, on_step=journal.record_progress if main else None)
        bar.close()
        clock.stop()
        timings["search"] = time.perf_counter() - tick
        ranks = team.gather(
            {
                "rank": team.rank,
                "blocks": list(slices.bounds[team.rank]),
                "memory": layout.to_json(),
                "calibration": calibration_clock.to_json() | {"state_bytes_sent": calibration_bytes},
                "search": clock.to_json() | {"state_bytes_sent": traffic.states - calibration_bytes},
                "traffic": traffic.to_json(),
                "blocks_loaded": runner.blocks_loaded,
                "bytes_read": runner.bytes_read,
                "token_forwards": runner.token_forwards,
            }
        )
    finally:
        cache.close()
        plan_states.close()
        runner.close()
        if journal is not None:
            journal.close()
    return _finish(
        team, reader, output, options, journal, input_ids, selection, scorer, ranks, slices, timings, started
    )


def _finish(team, reader, output, options, journal, input_ids, selection, scorer, ranks, slices, timings, started):
    """Rank 0 writes the output and tells the others how it went; every rank returns the same report."""
    outcome: dict = {}
    failure = None
    if team.is_main:
        report = _report_json(reader, options, input_ids, selection, scorer)
        report["timings_s"] = timings
        report["compute_dtype"] = str(scorer.runner.dtype).removeprefix("torch.")
        report["device"] = str(scorer.runner.device)
        report["resumed"] = journal.resumed
        report["distributed"] = {
            "world_size": team.size,
            "slices": slices.to_json(),
            "micro_batch": scorer.runner.micro_batch,
            "chunks": len(scorer.cache.chunks),
            "chunk_major": scorer.chunk_major,
            "ranks": ranks,
        }
        try:
            compensation = None
            if options.compensate == "linear":
                tick = time.perf_counter()
                compensation = _compensate_alone(reader, options, input_ids, selection, journal)
                timings["compensate"] = time.perf_counter() - tick
                report["compensation"] = compensation.to_json() | {"fitted_on": "rank 0 alone, recalibrated"}
            written = write_output(reader, output, options, selection, report, timings, compensation)
            journal.remove()
            outcome = {k: getattr(written, k) for k in ("blocks_after", "parameters_before", "parameters_after")}
        except Exception as exc:  # the others must not wait for a rank that stopped
            failure = exc
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
    outcome = team.share(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise SlmFastError(f"rank 0 could not write {output}: {outcome['error']}")
    return PruneReport(
        output=output,
        method=options.method,
        windows=sorted(selection.windows),
        dropped=selection.dropped,
        blocks_before=reader.num_blocks,
        similarity=selection.similarity,
        seconds=time.perf_counter() - started,
        **outcome,
    )


def _compensate_alone(reader, options, input_ids, selection, journal):
    """--compensate linear on rank 0 alone (module docstring): one-process calibration and fit, with
    the one-process memory budget (the other ranks have released theirs)."""
    runner, cache, plan_states, _ = _runtime(reader, options, input_ids.shape[0], spill_dir=journal.states_dir)
    try:
        calibrate(runner, input_ids, cache, progress=options.progress)
        return fit_compensation(runner, cache, options, selection)
    finally:
        cache.close()
        plan_states.close()
        runner.close()


def _distributed_options(options: PruneOptions, team: Team) -> PruneOptions:
    """Give each rank the GPU of its LOCAL_RANK (an explicit cuda:N is refused)."""
    device = torch.device(options.device)
    if device.type == "cuda":
        if device.index is not None:
            raise InputError(
                f"--device {options.device}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                "give --device cuda"
            )
        options = dataclasses.replace(options, device=f"cuda:{team.local_rank}")
    return options


def _pipeline_runtime(reader, options, n_samples, team: Team, spill_dir):
    """The one-process runtime sized by this rank's budget (the default budget shared by the ranks of
    one host on the CPU, where they share its RAM), with the micro-batch agreed by every rank (the
    chunks of the states sent must match; without --micro-batch, small enough for CHUNKS_PER_RANK
    chunks per rank in flight), whether each rank runs chunk-major (its slice stays resident) and the
    slices: each rank at most the blocks its memory keeps
    resident, and within that about equal search work (Slices.balanced, pipeline.search_work). When
    the ranks cannot hold the model together the slices follow their memory, and the blocks that do
    not fit are read again from the checkpoint in every sweep, as on one process."""
    budget, source = options.memory_budget, None
    if budget is None and torch.device(options.device).type == "cpu":
        budget, source = default_budget(torch.device("cpu"))
        budget //= max(1, team.local_size)
        source += f", shared by the {team.local_size} ranks of this host"
    sized = dataclasses.replace(options, memory_budget=budget)
    runner, cache, plan_states, layout = _runtime(reader, sized, n_samples, spill_dir=spill_dir)
    if source is not None:
        layout = dataclasses.replace(layout, budget_source=source)
    everyone = team.gather((layout.micro_batch, layout.block_bytes))
    micro_batch = options.micro_batch or min(
        min(m for m, _ in everyone), -(-n_samples // (CHUNKS_PER_RANK * team.size))
    )
    layout = dataclasses.replace(layout, micro_batch=micro_batch)
    runner.micro_batch = micro_batch
    block = max(block_param_bytes(reader, i, runner.dtype) for i in range(reader.num_blocks))
    capacities = [room // block for _, room in everyone]
    slices = Slices.balanced(search_work(reader.num_blocks), capacities)
    chunk_major = [capacity >= len(slices.blocks(r)) for r, capacity in enumerate(capacities)]
    return runner, cache, plan_states, layout, slices, chunk_major
