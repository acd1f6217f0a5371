"""Perplexity of token windows, block-streamed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.evaluation.streaming import stream_batches, target_log_probs
from slm_fast.runtime.stream import BlockRunner


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over `windows` windows of `seq_len` tokens. Every token but each window's first is
    predicted, so `tokens` = windows x (seq_len - 1)."""

    ppl: float
    mean_nll: float  # nats per predicted token
    tokens: int
    windows: int
    seq_len: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def perplexity(
    runner: BlockRunner,
    windows: Tensor,
    *,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    head_rows: int = 512,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """exp(mean next-token NLL) over `windows` [w, S] (int64 token ids), each window scored alone.

    Windows go through the blocks in batches of about `batch_tokens` tokens (this bounds activation
    memory), batches in groups whose hidden states fit `hidden_budget_bytes` (this bounds how often
    the checkpoint is read); the head runs on `head_rows` positions at a time. Sums are float64."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise InputError(f"perplexity needs windows of shape [w >= 1, S >= 2], got {tuple(windows.shape)}")
    count, seq_len = windows.shape
    per_batch = max(1, batch_tokens // seq_len)
    batches = list(windows.split(per_batch))
    total_nll = 0.0
    for index, hidden in stream_batches(runner, batches, hidden_budget_bytes, desc=desc, progress=progress):
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = batches[index][:, 1:].reshape(-1)
        total_nll -= float(target_log_probs(runner, rows, targets, head_rows).sum())
    tokens = count * (seq_len - 1)
    mean_nll = total_nll / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, tokens=tokens, windows=count, seq_len=seq_len)
