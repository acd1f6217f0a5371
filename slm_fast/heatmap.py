"""The paper's "patch-like" figure: the L x L CKA of every pair of block outputs on calibration text.

Block outputs are the residual stream after each block (before the final norm), as the reference's
heat-map script hooks them; every calibration token is a point (n = samples x seq_len), unlike the
reference's minibatch CKA over whole flattened sequences. The model runs block by block and the
outputs are kept in the hidden-state cache (which spills to disk past the memory budget).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slm_fast.checkpoint.reader import CheckpointReader
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
) -> Heatmap:
    started = time.perf_counter()
    reader = CheckpointReader(source)
    runner = BlockRunner(reader, device, dtype)
    cache = HiddenStateCache(runner.device, host_budget_bytes=memory_budget)
    try:
        calibrate(runner, input_ids, cache, progress=progress)
        outputs = [
            cache.get(block + 1).reshape(-1, cache.get(block + 1).shape[-1]) for block in range(reader.num_blocks)
        ]
        matrix = cka_matrix(outputs, kernel=kernel, backend=backend)
    finally:
        cache.close()
    return Heatmap(matrix, kernel, input_ids.numel(), time.perf_counter() - started)
