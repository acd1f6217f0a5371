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

from slm_fast.criteria import similarity_to_reference
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner
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
        }


class CandidateScorer:
    """Scores candidate models (committed windows plus one new window) against the original model.

    `cache` holds the original hidden state at every block boundary and `reference` the original
    final-norm outputs [N, S, d] of the same calibration tokens, `input_ids` [N, S] (needed by the
    ppl criterion). Logit criteria (kl, ppl) go through the runner's head.
    """

    def __init__(
        self,
        runner: BlockRunner,
        cache: HiddenStateCache,
        reference: Tensor,
        *,
        criterion: str,
        rule: str,
        on_evaluated: Callable[[int], None] | None = None,
        input_ids: Tensor | None = None,
    ):
        self.runner, self.cache, self.reference = runner, cache, reference
        self.input_ids = input_ids
        self.criterion, self.rule = criterion, rule
        self.on_evaluated = on_evaluated
        self.scores: dict[tuple[Committed, Window], float] = {}  # (committed above, window) -> score
        self.plan_scores: dict[tuple[Window, ...], float] = {}  # block sources -> score
        self.forward_passes = 0

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
            starts = [self.runner.apply(self.runner.block(w, self.rule), w[0], self.cache.get(w[0])) for w in todo]
            hidden = self._run_above(torch.cat(starts), hi + 1, above)
            outputs = self.runner.final_norm(hidden).split(self.reference.shape[0])
            for window, output in zip(todo, outputs, strict=True):
                self.scores[(above, window)] = self._similarity(output)
            self.forward_passes += len(todo)
            if self.on_evaluated is not None:
                self.on_evaluated(len(todo))
        return [self.scores[(above, w)] for w in windows]

    def score_plans(self, plans: list[list[Window]]) -> list[float]:
        """Scores of any pruned models, each given as the source window of every output block (dropped
        blocks simply absent), computed in one bottom-up sweep: each plan starts from the cached state
        where it first departs from the original model, and at every source block the plans that run
        the same block (original or merged) run it together, so each block is loaded once per sweep."""
        keys = [tuple(plan) for plan in plans]
        todo = [key for key in dict.fromkeys(keys) if key not in self.plan_scores]
        if todo:
            starts = [_departure(plan) for plan in todo]
            hidden: dict[int, Tensor] = {}
            cursor = list(starts)  # index of each plan's next entry (identity before the departure)
            for block in range(min(starts), self.runner.num_blocks):
                for index, start in enumerate(starts):
                    if start == block:
                        hidden[index] = self.cache.get(block)
                groups: dict[Window, list[int]] = {}
                for index in hidden:
                    if cursor[index] < len(todo[index]) and todo[index][cursor[index]][0] == block:
                        groups.setdefault(todo[index][cursor[index]], []).append(index)
                for window, members in groups.items():
                    batch = torch.cat([hidden[i] for i in members])
                    outputs = self.runner.apply(self.runner.block(window, self.rule), block, batch)
                    for i, output in zip(members, outputs.split(self.reference.shape[0]), strict=True):
                        hidden[i] = output
                        cursor[i] += 1
            for index, key in enumerate(todo):
                final = self.runner.final_norm(hidden.get(index, self.cache.get(self.runner.num_blocks)))
                self.plan_scores[key] = self._similarity(final)
            self.forward_passes += len(todo)
            if self.on_evaluated is not None:
                self.on_evaluated(len(todo))
        return [self.plan_scores[key] for key in keys]

    def _similarity(self, final: Tensor) -> float:
        return similarity_to_reference(
            self.criterion, self.reference, final, head=self.runner.logits, input_ids=self.input_ids
        )

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
            hidden = self.runner.apply(self.runner.block((block, hi), self.rule), block, hidden)
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
) -> SearchResult:
    """Grow merge windows one block at a time, always taking the growth that keeps the whole model most
    similar to the original: each step scores every way to remove one more block (open a two-block
    window on untouched blocks, extend a window by an untouched neighbour, or fuse two adjacent
    windows) on the model with all windows so far, in one sweep. Stops at `target_blocks` removed, or
    when the best growth is no longer strictly above `threshold`.

    The published scan spends a global similarity budget top-down on the first windows that pass,
    and on models whose top blocks are sensitive it merges there and nowhere else; this search
    places each removal where it costs least (bench/quality.md measures both).
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
