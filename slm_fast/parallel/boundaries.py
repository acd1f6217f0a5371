"""The baselines that read the calibration's boundary states (ShortGPT, Gromov et al.), when the
boundaries are spread over the pipeline's ranks: what crosses the network is small (one score per
block, or each boundary's last token), never whole states.

The one-process counterparts read a `HiddenStateCache` holding every boundary (prune.LocalBoundaries).
"""

from __future__ import annotations

from slm_fast import baselines
from slm_fast.parallel.pipeline import Slices
from slm_fast.parallel.team import Team
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.similarity import block_influence


class PipelineBoundaries:
    """`cache` holds this rank's boundaries: the inputs of its blocks and its slice's output
    (calibrate_slice(keep_output=True) for ShortGPT), and boundary L on the last rank."""

    def __init__(self, cache: HiddenStateCache, slices: Slices, team: Team):
        self.cache, self.slices, self.team = cache, slices, team

    def block_influence(self, num_blocks: int) -> list[float]:
        """ShortGPT's BI of every block: each rank scores its own blocks; the scores are gathered."""
        own = {
            b: block_influence(self.cache.get(b), self.cache.get(b + 1)).item()
            for b in self.slices.blocks(self.team.rank)
        }
        merged = {b: score for part in self.team.gather(own) for b, score in part.items()}
        return [merged[b] for b in range(num_blocks)]

    def angular_distances(self, num_blocks: int, n: int) -> list[float]:
        """Gromov et al.'s distances, which read each sample's last token only: the ranks gather the
        last token of every boundary they keep, and each rank computes the distances from those."""
        start, stop = self.slices.bounds[self.team.rank]
        kept = list(range(start, stop)) + ([num_blocks] if self.team.rank == self.team.last else [])
        own = {b: self.cache.get(b)[:, -1:, :].cpu() for b in kept}
        last_tokens = HiddenStateCache()
        for part in self.team.gather(own):
            for boundary, tokens in part.items():
                last_tokens.put(boundary, tokens)
        try:
            return baselines.gromov_distances(last_tokens, num_blocks, n)
        finally:
            last_tokens.close()
