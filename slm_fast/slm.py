"""The sliding-window search of SLM (arXiv 2502.19159), out of core, and the threshold search.

The scan runs from the top of the network down with a window [lo, hi] (slm_reference.md section 2):
a candidate model is the model with the windows committed so far merged plus [lo, hi] merged; while
its similarity to the original model stays strictly above the threshold the window grows downward;
when it fails, the last passing window (2 blocks or more) is committed and the scan continues below.

Costs are kept down three ways:
- a candidate starts from the cached original hidden state at the input of its lowest block (blocks
  below a window are untouched), so only the merged block and the blocks above it run;
- `speculate` > 1 evaluates several downward extents [lo - k, hi] of the current window in one pass:
  each block above hi is applied once to all of them (loaded once, when it is not resident);
- every score is memoised by (committed windows, window), so a threshold search re-running the scan
  at other thresholds pays only for candidates it has not seen; blocks, merged or not, stay resident
  within the runner's memory budget (committed merged blocks are reused by every later candidate).

`parity=True` reproduces the reference exactly, edge cases included: the window still pending when
the scan reaches the bottom is dropped, and the no-op candidate [lo, lo] that follows every commit is
recorded. The default mode commits that pending window and allows windows down to `protect_bottom`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.criteria import similarity_to_reference
from slm_fast.merge import merge_window, settings_block
from slm_fast.runtime.cache import HiddenStateCache, TieredStore
from slm_fast.runtime.stream import BlockRunner, BlockSpec
from slm_fast.windows import Window, output_blocks

Committed = tuple[Window, ...]


@dataclass
class Candidate:
    lo: int
    hi: int
    similarity: float
    passed: bool
    note: str = ""


@dataclass
class SearchResult:
    threshold: float | None  # None for a best-first search run to a block count
    windows: list[Window]  # in commit order (top first; sorted for best-first)
    candidates: list[Candidate] = field(default_factory=list)
    similarity: float | None = None  # of the final model (all windows merged); None if none was
    step_seconds: list[float] = field(default_factory=list)  # elapsed at each step's end, where recorded

    @property
    def blocks_removed(self) -> int:
        return sum(hi - lo for lo, hi in self.windows)

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold,
            "windows": [list(w) for w in sorted(self.windows)],
            "blocks_removed": self.blocks_removed,
            "similarity": self.similarity,
            "candidates": [asdict(c) for c in self.candidates],
        } | ({"step_seconds": self.step_seconds} if self.step_seconds else {})


def window_block(window: Window, rule: str, reader: CheckpointReader, average_settings: str = "low") -> BlockSpec:
    """What the runner builds for source window [lo, hi]: the original block when lo == hi, else the
    window merged by `rule`, built with the per-layer settings of the block whose weights dominate
    (merge.settings_block; `average_settings` decides for the averaging rules)."""
    lo, hi = window
    if lo == hi:
        return BlockSpec.original(lo)
    reads = {"keep_high": (hi,), "keep_low": (lo,), "keep_high_norms_low": (lo, hi)}.get(rule, tuple(range(lo, hi + 1)))

    def tensors(read_block):
        return merge_window(read_block, lo, hi, rule, is_projection=reader.arch.is_projection)

    return BlockSpec(("merged", lo, hi, rule), settings_block(lo, hi, rule, average_settings), reads, tensors)


def sweep_schedule(
    plans: list[tuple[Window, ...]], num_blocks: int
) -> list[tuple[int, list[tuple[Window, list[int]]]]]:
    """The bottom-up sweep that scores `plans` (each the source window of every output block): for
    every source block from the lowest departure up, the windows that start there with the plans that
    run them. A plan joins at its departure (where it first differs from the original model)."""
    starts = [_departure(list(plan)) for plan in plans]
    cursor = list(starts)
    schedule = []
    for block in range(min(starts, default=num_blocks), num_blocks):
        groups: dict[Window, list[int]] = {}
        for index, plan in enumerate(plans):
            if starts[index] <= block and cursor[index] < len(plan) and plan[cursor[index]][0] == block:
                groups.setdefault(plan[cursor[index]], []).append(index)
                cursor[index] += 1
        if groups:
            schedule.append((block, list(groups.items())))
    return schedule


@dataclass(frozen=True)
class Entry:
    """The original model's hidden state at block boundary `boundary`: where a plan that has not yet
    run a window of its own starts from (its departure; a plan whose first change is a dropped block
    enters below the block it runs first)."""

    boundary: int


class SharedStates:
    """Which plans of a sweep hold the same hidden state. Plans that ran the same windows on the same
    input hold identical states (bit for bit), so each distinct history is computed and stored once;
    a state is released when no plan holds it any more. The sweep and the cost model both use this."""

    def __init__(self, plans: list[tuple[Window, ...]]):
        self.entries = [_departure(list(plan)) for plan in plans]  # plan -> boundary it enters from
        self.state_of: dict[int, int] = {}  # plan -> state id (absent: still at its entry boundary)
        self.holders: dict[int, int] = {}  # state id -> plans holding it
        self._ids = itertools.count()

    def source(self, plan: int) -> int | Entry:
        """What `plan` holds now: a state id, or the original state at its entry boundary."""
        state = self.state_of.get(plan)
        return Entry(self.entries[plan]) if state is None else state

    def advance(self, members: list[int]) -> list[tuple[int | Entry, int]]:
        """The plans `members` run the same block next: one (source, new state) pair per distinct
        source; the members move to the new states."""
        by_source: dict[int | Entry, list[int]] = {}
        for plan in members:
            by_source.setdefault(self.source(plan), []).append(plan)
        moves = []
        for source, plans in by_source.items():
            target = next(self._ids)
            for plan in plans:
                self.state_of[plan] = target
            self.holders[target] = len(plans)
            if not isinstance(source, Entry):
                self.holders[source] -= len(plans)
            moves.append((source, target))
        return moves

    def drop_if_unheld(self, state: int | Entry) -> int | None:
        """`state` if no plan holds it any more (forgotten, to be released), else None."""
        if not isinstance(state, Entry) and self.holders.get(state) == 0:
            del self.holders[state]
            return state
        return None

    def finish(self, plan: int) -> int | None:
        """The plan is scored: its state, if it was the last plan holding it."""
        state = self.state_of.pop(plan, None)
        if state is None:
            return None
        self.holders[state] -= 1
        return self.drop_if_unheld(state)


class CandidateScorer:
    """Scores candidate models (committed windows plus one new window) against the original model.

    `cache` holds the original hidden state at every block boundary, in chunks of samples, and
    `reference` the original final-norm outputs [N, S, d] of the same calibration tokens, `input_ids`
    [N, S] (needed by the ppl criterion); logit criteria (kl, ppl) go through the runner's head. The
    plan states of a sweep live in `states` (default: the cache's store), so a memory budget bounds
    them (what does not fit goes to host memory, then disk), and each runs one chunk of samples at a time.

    Every score is memoised (`scores` for the sliding scan, `plan_scores` for whole plans);
    `on_scored(kind, key, score)` sees each new one (the run journal), and entries put into the two
    dicts beforehand are never recomputed (a resumed run).
    """

    def __init__(
        self,
        runner: BlockRunner,
        cache: HiddenStateCache,
        reference: Tensor,
        *,
        criterion: str,
        rule: str,
        average_settings: str = "low",
        on_evaluated: Callable[[int], None] | None = None,
        on_scored: Callable[[str, tuple, float], None] | None = None,
        states: TieredStore | None = None,
        input_ids: Tensor | None = None,
    ):
        self.runner, self.cache, self.reference = runner, cache, reference
        self.states = states or cache.store  # where the sweeps keep plan states
        self.input_ids = input_ids
        self.criterion, self.rule, self.average_settings = criterion, rule, average_settings
        self.on_evaluated = on_evaluated
        self.on_scored = on_scored
        self.scores: dict[tuple[Committed, Window], float] = {}  # (committed above, window) -> score
        self.plan_scores: dict[tuple[Window, ...], float] = {}  # block sources -> score
        self.forward_passes = 0
        self.sweeps: list[list[tuple[Window, ...]]] = []  # the plans of every sweep run, in order

    def spec(self, window: Window) -> BlockSpec:
        return window_block(window, self.rule, self.runner.reader, self.average_settings)

    def _run_window(self, window: Window, hidden: Tensor) -> Tensor:
        spec = self.spec(window)
        return self.runner.apply(self.runner.block(spec), spec.layer_index, hidden)

    def score(self, committed: Committed, windows: list[Window]) -> list[float]:
        """Scores of the models `committed` + one of `windows` (speculative extents sharing their top
        block hi), computed in one pass. Committed windows lie above hi or inside the new window,
        which then absorbs them (LaCo's loop re-merges merged layers); none may lie below it."""
        hi = windows[0][1]
        if any(w[1] != hi for w in windows):
            raise ValueError(f"speculative windows must share their top block: {windows}")
        lowest = min(lo for lo, _ in windows)
        if any(w[0] < lowest <= w[1] or w[1] < lowest for w in committed):
            raise ValueError(f"committed windows {committed} reach below candidate windows {windows}")
        above = self._above(committed, hi)
        todo = [w for w in dict.fromkeys(windows) if (above, w) not in self.scores]
        if todo:
            for window, score in zip(todo, self._score_windows(above, todo), strict=True):
                self.scores[(above, window)] = score
                if self.on_scored is not None:
                    self.on_scored("window", (above, window), score)
            self.forward_passes += len(todo)
            if self.on_evaluated is not None:
                self.on_evaluated(len(todo))
        return [self.scores[(above, w)] for w in windows]

    def _score_windows(self, above: Committed, windows: list[Window]) -> list[float]:
        """Scores of `above` + each of `windows` (sharing their top block): each window starts from the
        cached state at its lowest block, and the blocks above run once on all of them together."""
        starts = [self._run_window(w, self.cache.get(w[0])) for w in windows]
        hidden = self._run_above(torch.cat(starts), windows[0][1] + 1, above)
        outputs = self.runner.final_norm(hidden).split(self.reference.shape[0])
        return [self._similarity([output]) for output in outputs]

    def score_plans(self, plans: list[list[Window]]) -> list[float]:
        """Scores of any pruned models, each given as the source window of every output block (dropped
        blocks simply absent), computed in one bottom-up sweep (`sweep_schedule`): each plan starts
        from the cached state where it first departs from the original model, and every block run at
        a source position is built once and applied to each plan that runs it, one chunk of samples at
        a time, so each block is loaded once per sweep whatever the calibration size."""
        keys = [tuple(plan) for plan in plans]
        todo = [key for key in dict.fromkeys(keys) if key not in self.plan_scores]
        if todo:
            self.sweeps.append(todo)
            self._sweep(todo)
            self.forward_passes += len(todo)
            if self.on_evaluated is not None:
                self.on_evaluated(len(todo))
        return [self.plan_scores[key] for key in keys]

    def _sweep(self, todo: list[tuple[Window, ...]]) -> None:
        """Run the sweep. Plans whose histories are identical so far (the same windows on the same
        input) hold one shared state, computed once: a plan departs from the original model at its
        first new window, and from the plans it shared a state with where their windows differ."""
        store, chunks, num_blocks = self.states, range(len(self.cache.chunks)), self.runner.num_blocks
        schedule = sweep_schedule(todo, num_blocks)
        self.runner.plan([self.spec(window) for _, groups in schedule for window, _ in groups])
        shared = SharedStates(todo)
        try:
            for _, groups in schedule:
                for window, members in groups:
                    spec = self.spec(window)
                    module = self.runner.block(spec)
                    for source, target in shared.advance(members):
                        for chunk in chunks:
                            if isinstance(source, Entry):
                                hidden = self.cache.get_chunk(source.boundary, chunk)
                            else:
                                hidden = store.get(("state", source, chunk))
                            store.put(("state", target, chunk), self.runner.apply(module, spec.layer_index, hidden))
                        self._release(shared.drop_if_unheld(source))
            for index, key in enumerate(todo):
                source = shared.source(index)
                finals = (
                    self.runner.final_norm(
                        self.cache.get_chunk(source.boundary, chunk)
                        if isinstance(source, Entry)
                        else store.get(("state", source, chunk))
                    )
                    for chunk in chunks
                )
                score = self._similarity(finals)
                self._release(shared.finish(index))
                self.plan_scores[key] = score
                if self.on_scored is not None:
                    self.on_scored("plan", key, score)
        finally:
            self._release(list(shared.holders))

    def _similarity(self, finals) -> float:
        """The criterion on a candidate's final-norm outputs, given chunk by chunk. Cosine is a mean over
        samples, so it is taken one sample at a time (memory of one chunk, whatever the calibration
        size); the other criteria see all tokens at once (the logit criteria stream the head's output
        over token chunks)."""
        if self.criterion != "cosine":
            return similarity_to_reference(
                self.criterion,
                self.reference,
                torch.cat(list(finals)),
                head=self.runner.logits,
                input_ids=self.input_ids,
            )
        per_sample, row = [], 0
        for final in finals:
            for sample in final.split(1):
                per_sample.append(similarity_to_reference("cosine", self.reference[row : row + 1], sample))
                row += 1
        return torch.tensor(per_sample, dtype=torch.float64).mean().item()

    def _release(self, states) -> None:
        for state in states if isinstance(states, list) else [states]:
            if state is not None:
                for chunk in range(len(self.cache.chunks)):
                    self.states.discard(("state", state, chunk))

    def cached_score(self, committed: Committed, window: Window) -> float:
        return self.scores[(self._above(committed, window[1]), window)]

    @staticmethod
    def _above(committed: Committed, hi: int) -> Committed:
        return tuple(sorted(w for w in committed if w[0] > hi))

    def _run_above(self, hidden: Tensor, start: int, committed: Committed) -> Tensor:
        tops = {lo: hi for lo, hi in committed}
        block = start
        while block < self.runner.num_blocks:
            hi = tops.get(block, block)
            hidden = self._run_window((block, hi), hidden)
            block = hi + 1
        return hidden


def sliding_search(
    scorer: CandidateScorer,
    num_blocks: int,
    threshold: float,
    *,
    parity: bool = False,
    protect_top: int = 1,
    protect_bottom: int = 0,
    speculate: int = 1,
) -> SearchResult:
    """Run the top-down sliding-window scan at `threshold` (see the module docstring).

    protect_top: blocks at the top never merged (the reference never merges the last block: 1).
    protect_bottom: blocks at the bottom never merged (ignored with `parity`, where the reference's
    own rule applies: the scan visits block 0 but can never commit a window that starts there).
    """
    floor = 0 if parity else protect_bottom
    hi = num_blocks - 1 - protect_top
    lo = hi - 1
    committed: Committed = ()
    result = SearchResult(threshold=threshold, windows=[])
    while lo >= floor:
        extents = [(k, hi) for k in range(lo, max(floor, lo - speculate + 1) - 1, -1)]
        similarity = scorer.score(committed, extents)[0]
        passed = similarity > threshold
        result.candidates.append(Candidate(lo, hi, similarity, passed))
        if passed:
            lo -= 1
        elif lo + 1 != hi:
            committed += ((lo + 1, hi),)
            hi = lo
            if parity:  # the reference re-evaluates the committed model as the no-op window [lo, lo]
                result.candidates.append(
                    Candidate(lo, lo, scorer.cached_score(committed[:-1], committed[-1]), True, "no-op")
                )
            lo -= 1
        else:
            hi -= 1
            lo -= 1
    if not parity and hi - (lo + 1) >= 1:
        committed += ((lo + 1, hi),)
        result.candidates[-1].note = "committed at the bottom of the scan"
    result.windows = list(committed)
    if committed:  # the last committed window was scored on top of all the others
        result.similarity = scorer.cached_score(committed[:-1], committed[-1])
    return result


def best_first_search(
    scorer: CandidateScorer,
    num_blocks: int,
    *,
    target_blocks: int | None = None,
    threshold: float | None = None,
    protect_top: int = 1,
    protect_bottom: int = 0,
    on_step: Callable[[int, list[Window], float | None], None] | None = None,
) -> SearchResult:
    """Grow merge windows one block at a time, always taking the growth that keeps the whole model most
    similar to the original: each step scores every way to remove one more block (open a two-block
    window on untouched blocks, extend a window by an untouched neighbour, or fuse two adjacent
    windows) on the model with all windows so far, in one sweep. Stops at `target_blocks` removed, or
    when the best growth is no longer strictly above `threshold`.

    The published scan spends a global similarity budget top-down on the first windows that pass,
    and on models whose top blocks are sensitive it merges there and nowhere else; this search
    places each removal where it costs least (bench/quality.md measures both).
    `on_step(step, windows, similarity)` sees the windows after every step taken (the run journal).
    """
    if (target_blocks is None) == (threshold is None):
        raise ValueError("give exactly one of target_blocks and threshold")
    lowest, highest = protect_bottom, num_blocks - 1 - protect_top
    windows: list[Window] = []
    result = SearchResult(threshold=threshold, windows=[])
    step = 0
    while target_blocks is None or step < target_blocks:
        growths = _growths(windows, lowest, highest)
        if not growths:
            break
        scores = scorer.score_plans([output_blocks(grown, num_blocks) for grown, _ in growths])
        best = max(range(len(growths)), key=scores.__getitem__)
        accepted = threshold is None or scores[best] > threshold
        step += 1
        for index, ((_, window), score) in enumerate(zip(growths, scores, strict=True)):
            chosen = index == best and accepted
            result.candidates.append(Candidate(*window, score, chosen, f"step {step}" + (", taken" if chosen else "")))
        if not accepted:
            break
        windows, result.similarity = growths[best][0], scores[best]
        if on_step is not None:
            on_step(step, windows, result.similarity)
    result.windows = windows
    return result


def _growths(windows: list[Window], lowest: int, highest: int) -> list[tuple[list[Window], Window]]:
    """Every window set with one more block removed that keeps each window inside a window (sorted
    `windows` in, each growth with the window that changed). Fusing adjacent windows matters: without
    it, [13, 15] + [16, 19] could never become the single window [13, 19] that removes one more."""
    covered = {b for lo, hi in windows for b in range(lo, hi + 1)}
    free = {b for b in range(lowest, highest + 1) if b not in covered}
    growths = [(sorted([*windows, (b, b + 1)]), (b, b + 1)) for b in sorted(free) if b + 1 in free]
    for index, (lo, hi) in enumerate(windows):
        others = windows[:index] + windows[index + 1 :]
        for grown in ((lo - 1, hi), (lo, hi + 1)):
            if {grown[0], grown[1]} - {lo, hi} <= free:
                growths.append((sorted([*others, grown]), grown))
    for (lo, hi), (next_lo, next_hi) in itertools.pairwise(windows):
        if hi + 1 == next_lo:
            fused = (lo, next_hi)
            growths.append((sorted([w for w in windows if w not in ((lo, hi), (next_lo, next_hi))] + [fused]), fused))
    return growths


def _departure(block_sources: list[Window]) -> int:
    """The first output position whose source is not the original block at that position."""
    return next(
        (position for position, window in enumerate(block_sources) if window != (position, position)),
        len(block_sources),
    )


@dataclass
class ThresholdSearch:
    """Outcome of searching the threshold that removes a target number of blocks."""

    result: SearchResult
    target_blocks: int
    tried: list[tuple[float, int]]
    exact: bool
    reason: str = ""


def search_threshold(
    run: Callable[[float], SearchResult],
    target_blocks: int,
    *,
    low: float = 0.0,
    high: float = 1.0,
    grid: int = 11,
    iterations: int = 30,
) -> ThresholdSearch:
    """Find a threshold at which the scan removes exactly `target_blocks` blocks.

    Removal falls as the threshold rises, but not monotonically everywhere: with the reference's
    quirks a threshold so low that every window passes removes nothing (the pending window is
    dropped at the bottom). So the scan is first run on a grid over [low, high]; the highest grid
    threshold that hits the target wins; otherwise the highest bracket where removal crosses the
    target (more above, fewer below) is bisected. The outcome only changes where the threshold
    crosses a candidate's similarity, and scores are memoised, so later runs are cheap. When no
    threshold hits the target, the closest result is returned (the smaller removal on a tie) with
    the reason.
    """
    tried: list[tuple[float, int]] = []
    best: SearchResult | None = None

    def attempt(threshold: float) -> SearchResult:
        nonlocal best
        outcome = run(threshold)
        tried.append((threshold, outcome.blocks_removed))
        if best is None or _closer(outcome.blocks_removed, best.blocks_removed, target_blocks):
            best = outcome
        return outcome

    points = [low + (high - low) * i / (grid - 1) for i in range(grid)]
    for threshold in reversed(points):  # from the top: the first exact hit is the highest
        if attempt(threshold).blocks_removed == target_blocks:
            return ThresholdSearch(best, target_blocks, tried, True)
    removal = dict(tried)
    brackets = [(a, b) for a, b in itertools.pairwise(points) if removal[a] > target_blocks > removal[b]]
    if not brackets:
        most = max(removal.values())
        reason = f"no threshold in [{low}, {high}] removes {target_blocks} blocks (at most {most})"
        return ThresholdSearch(best, target_blocks, tried, False, reason)
    above, below = brackets[-1]
    for _ in range(iterations):
        middle = (above + below) / 2
        removed = attempt(middle).blocks_removed
        if removed == target_blocks:
            return ThresholdSearch(best, target_blocks, tried, True)
        if removed > target_blocks:
            above = middle
        else:
            below = middle
    reason = (
        f"no threshold removes exactly {target_blocks} blocks: removal jumps from "
        f"{dict(tried)[above]} (threshold {above:.6f}) to {dict(tried)[below]} "
        f"(threshold {below:.6f})"
    )
    return ThresholdSearch(best, target_blocks, tried, False, reason)


def _closer(candidate: int, incumbent: int, target: int) -> bool:
    gap, best_gap = abs(candidate - target), abs(incumbent - target)
    return gap < best_gap or (gap == best_gap and candidate < incumbent)
