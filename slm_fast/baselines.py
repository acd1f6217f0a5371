"""The peers' depth-pruning methods, computed from the same block-streamed calibration as SLM so that
the comparison differs only in the method (reference/peers.md section 2):

- ShortGPT (2403.03853): block influence BI_i = 1 - cos(h_i, h_{i+1}) per token, averaged over every
  calibration token; the n blocks of lowest BI are removed.
- Gromov et al. (2403.17887): angular distance arccos(cos(h_l, h_{l+n})) / pi on each sample's last
  token, averaged over samples; the contiguous blocks l*..l*+n-1 of smallest distance are removed.
- LaCo (2402.11187): its collapse loop as published, from the top down in the current model's
  numbering: merge MERGE_LAYERS layers into the layer below them while the cosine of the final outputs
  stays above the threshold (a merged layer can be merged again), with the effective rule of its code
  (the top layer's projections, the bottom layer's norms: keep_high_norms_low).
- last-n: drop the n blocks just below the final one.
- SLEB (2402.09025): remove blocks one at a time, each time the block whose removal from the current
  model costs least calibration perplexity; the first and last blocks are never removed. Each step
  scores every remaining candidate in one block-streamed sweep (CandidateScorer.score_plans with the
  ppl criterion).

h_i is the residual stream at block boundary i (the input of block i; h_L the last block's output,
before the final norm), read from the calibration cache. The peers' code takes Hugging Face's
hidden_states, whose last entry is after the final norm; that differs only for the last block.
"""

from __future__ import annotations

import math
import time

from slm_fast.errors import InputError
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.similarity import angular_distance, block_influence
from slm_fast.slm import Candidate, CandidateScorer, SearchResult
from slm_fast.windows import Window, output_blocks

METHODS = ("slm", "shortgpt", "gromov", "laco", "last-n", "sleb")
LACO_RULE = "keep_high_norms_low"


def shortgpt_scores(cache: HiddenStateCache, num_blocks: int) -> list[float]:
    """Block influence of every block (lower = more redundant)."""
    return [block_influence(cache.get(a), cache.get(b)).item() for a, b in _shortgpt_pairs(num_blocks)]


def shortgpt_blocks(scores: list[float], remove: int) -> list[int]:
    _check_count(remove, len(scores))
    return sorted(sorted(range(len(scores)), key=scores.__getitem__)[:remove])


def gromov_distances(cache: HiddenStateCache, num_blocks: int, n: int) -> list[float]:
    """Mean last-token angular distance between h_l and h_{l+n} for every l = 0..L-n."""
    _check_count(n, num_blocks)
    return [angular_distance(cache.get(a), cache.get(b)).mean().item() for a, b in _gromov_pairs(num_blocks, n)]


def gromov_blocks(distances: list[float], n: int) -> list[int]:
    start = min(range(len(distances)), key=distances.__getitem__)
    return list(range(start, start + n))


def boundary_reads(method: str, num_blocks: int, n: int) -> list[int]:
    """The boundary states (whole, in order) that the one-pass methods' scores read from the cache:
    shortgpt_scores and gromov_distances; last-n reads none. The cost model replays these reads."""
    pairs = {"shortgpt": lambda: _shortgpt_pairs(num_blocks), "gromov": lambda: _gromov_pairs(num_blocks, n)}
    return [b for pair in pairs.get(method, list)() for b in pair]


def _shortgpt_pairs(num_blocks: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(num_blocks)]


def _gromov_pairs(num_blocks: int, n: int) -> list[tuple[int, int]]:
    return [(l, l + n) for l in range(num_blocks - n + 1)]


def last_n_blocks(num_blocks: int, n: int) -> list[int]:
    _check_count(n, num_blocks - 1)
    return list(range(num_blocks - 1 - n, num_blocks - 1))


def laco_search(
    scorer: CandidateScorer,
    num_blocks: int,
    threshold: float,
    *,
    merge_layers: int = 2,
    interval: int = 1,
    highest: int | None = None,
    lowest: int = 0,
) -> SearchResult:
    """LaCo's loop (its notebook's `while lay >= LOWEST_LAY`), tracked in source block numbering: each
    current layer is a source window, and merging current layers lay..lay+C is the source window from
    the lowest's bottom to the highest's top (keep_high_norms_low composes that way)."""
    if merge_layers < 1 or interval < 1:
        raise InputError(f"LaCo needs merge_layers >= 1 and interval >= 1, got {merge_layers} and {interval}")
    highest = num_blocks - 1 if highest is None else highest
    layers: list[Window] = [(i, i) for i in range(num_blocks)]
    result = SearchResult(threshold=threshold, windows=[])
    lay = highest - merge_layers
    while lay >= lowest:
        lay = min(lay, len(layers) - 1 - merge_layers)
        if lay < lowest:
            break
        window = (layers[lay][0], layers[lay + merge_layers][1])
        committed = tuple(w for w in layers if w[0] != w[1])
        similarity = scorer.score(committed, [window])[0]
        passed = similarity > threshold
        result.candidates.append(Candidate(*window, similarity, passed))
        if passed:
            layers[lay : lay + merge_layers + 1] = [window]
            result.similarity = similarity
            lay -= interval
        else:
            lay -= 1
    result.windows = [w for w in layers if w[0] != w[1]]
    return result


def sleb_search(scorer: CandidateScorer, num_blocks: int, remove: int) -> SearchResult:
    """SLEB's greedy loop; `scorer` must score by the ppl criterion (minus calibration log-perplexity).
    Returns the dropped blocks as one-block windows in removal order, every candidate scored (the
    similarity is minus the log-perplexity of the model with that block also removed). The greedy loop
    is nested: the first k steps of a run to n > k blocks are the run to k, so `step_seconds` (search
    seconds elapsed at the end of each step) gives every smaller removal's search time as well."""
    if scorer.criterion != "ppl":
        raise ValueError(f"SLEB ranks removals by perplexity, not by {scorer.criterion}")
    _check_count(remove, max(num_blocks - 2, 0))
    dropped: list[int] = []
    result = SearchResult(threshold=None, windows=[])
    start = time.perf_counter()
    for step in range(1, remove + 1):
        candidates = [b for b in range(1, num_blocks - 1) if b not in dropped]
        scores = scorer.score_plans([output_blocks([], num_blocks, [*dropped, b]) for b in candidates])
        best = max(range(len(candidates)), key=scores.__getitem__)
        for index, (block, score) in enumerate(zip(candidates, scores, strict=True)):
            note = f"step {step}" + (", removed" if index == best else "")
            result.candidates.append(Candidate(block, block, score, index == best, note))
        dropped.append(candidates[best])
        result.similarity = scores[best]
        result.step_seconds.append(time.perf_counter() - start)
    result.windows = [(b, b) for b in dropped]
    return result


def _check_count(n: int, available: int) -> None:
    if not 0 <= n <= available:
        raise InputError(f"cannot remove {n} blocks: 0..{available} are possible here")


def blocks_for_ratio(total_parameters: int, block_parameters: int, ratio: float) -> int:
    """Blocks to remove so that the removed parameters are closest to `ratio` of the model's."""
    return math.floor(ratio * total_parameters / block_parameters + 0.5)
