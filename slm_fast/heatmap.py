"""The paper's "patch-like" figure: the L x L CKA of every pair of block outputs on calibration text.

Block outputs are the residual stream after each block (before the final norm), as the reference's
heat-map script hooks them; every calibration token is a point (n = samples x seq_len), unlike the
reference's minibatch CKA over whole flattened sequences. The model runs block by block and the
outputs are kept in the hidden-state cache (which spills to disk past the memory budget).

On several processes (`process_group`), data-parallel over the samples: each rank runs its contiguous
share of the samples (rank order) through the model, read by every rank, and the CKA is token-parallel
(similarity/distributed.py), so every rank gets the matrix of one process on all the samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.parallel.data_parallel import shard
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.similarity import cka_matrix


@dataclass
class Heatmap:
    matrix: torch.Tensor  # [L, L] float64
    kernel: str
    tokens: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "kernel": self.kernel,
            "tokens": self.tokens,
            "blocks": self.matrix.shape[0],
            "cka": [[None if v != v else v for v in row] for row in self.matrix.tolist()],
            "seconds": self.seconds,
        }


def block_output_cka(
    source: str | Path,
    input_ids: torch.Tensor,
    *,
    kernel: str = "linear",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: int = 8 * 10**9,
    backend: str = "auto",
    progress: bool = True,
    process_group: object | None = None,
) -> Heatmap:
    """The heat map of `input_ids` [samples, seq_len]. process_group: a torch.distributed group whose
    ranks all pass the same `input_ids` (and options); each runs its share of the samples (a collective:
    call it on every rank; a rank whose share is empty reads no block)."""
    started = time.perf_counter()
    reader = CheckpointReader(source)
    runner = BlockRunner(reader, device, dtype)
    mine = input_ids
    if process_group is not None:
        rows = shard(input_ids.shape[0], dist.get_rank(process_group), dist.get_world_size(process_group))
        mine = input_ids[rows.start : rows.stop]
    cache = HiddenStateCache(runner.device, host_budget_bytes=memory_budget)
    try:
        if len(mine):
            calibrate(runner, mine, cache, progress=progress)
            outputs = [cache.get(block + 1).flatten(0, -2) for block in range(reader.num_blocks)]
        else:
            width = runner.parts.config.hidden_size
            outputs = [torch.empty(0, width, dtype=runner.dtype, device=runner.device)] * reader.num_blocks
        matrix = cka_matrix(outputs, kernel=kernel, backend=backend, process_group=process_group)
    finally:
        cache.close()
    return Heatmap(matrix, kernel, input_ids.numel(), time.perf_counter() - started)
