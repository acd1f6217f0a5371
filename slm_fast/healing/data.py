"""Training batches for healing: consecutive windows of `cutoff` tokens over the corpus, visited in a
seeded random order per epoch, so the batch of any step is known without replaying earlier steps (a
resumed run sees exactly the batches an uninterrupted one would)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def training_windows(folder: Path, corpus: str, cutoff: int) -> Tensor:
    """[W, cutoff] token ids of `corpus` (a name or a .txt/.jsonl path, as for --calib)."""
    from transformers import AutoTokenizer

    from slm_fast.data import evaluation_windows, load_corpus

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return evaluation_windows(tokenizer, load_corpus(corpus), cutoff)


def batch_for_step(windows: Tensor, step: int, batch_size: int, seed: int) -> Tensor:
    """The windows of training step `step` (0-based): positions step * batch_size ... in the sequence
    formed by concatenating one seeded permutation of the windows per epoch."""
    count = windows.shape[0]
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(order[index])
    return windows[torch.stack(rows)]
