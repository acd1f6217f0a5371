"""Perplexity of token windows, block-streamed: non-overlapping windows, or the strided sliding
window of Hugging Face's perplexity guide (each window scores only the tokens past the previous one,
with the rest of the window as context).

On several processes (`process_group`) each rank scores a contiguous share of the batches of windows
(the batches one process would form, so every window is computed exactly as there) and the per-window
log-likelihoods are summed over the ranks; every rank then sums them in window order, as one process
does, and gets the same perplexity, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.evaluation.streaming import stream_batches, target_log_probs
from slm_fast.parallel.data_parallel import shard
from slm_fast.parallel.launch import communicate
from slm_fast.runtime.stream import BlockRunner


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over `windows` windows of `seq_len` tokens that predicted `tokens` tokens in all:
    windows x (seq_len - 1) without a stride; with one, the first window predicts seq_len - 1 tokens
    and every later one min(stride, seq_len - 1)."""

    ppl: float
    mean_nll: float  # nats per predicted token
    tokens: int
    windows: int
    seq_len: int
    stride: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def strided_windows(ids: Sequence[int], seq_len: int, stride: int, max_windows: int | None = None) -> Tensor:
    """Windows of `seq_len` tokens starting every `stride` tokens of `ids` (w x seq_len int64), as
    many as fit whole (at most `max_windows`)."""
    if seq_len < 2 or stride < 1 or (max_windows is not None and max_windows < 1):
        raise InputError(f"need seq_len >= 2, stride >= 1 and max_windows >= 1, got {seq_len}, {stride}, {max_windows}")
    starts = range(0, len(ids) - seq_len + 1, stride)
    starts = starts[:max_windows] if max_windows is not None else starts
    if not starts:
        raise InputError(f"the corpus is shorter than one window of {seq_len} tokens")
    return torch.tensor([list(ids[start : start + seq_len]) for start in starts], dtype=torch.long)


def perplexity(
    runner: BlockRunner,
    windows: Tensor,
    *,
    stride: int | None = None,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    head_rows: int = 512,
    progress: bool = True,
    desc: str = "perplexity",
    process_group: object | None = None,
) -> PerplexityResult:
    """exp(mean next-token NLL) over `windows` [w, S] (int64 token ids), each window run on its own.

    Without `stride` every window's S - 1 next tokens are scored. With `stride` (windows from
    `strided_windows`) the first window scores all its S - 1, every later one only its last
    min(stride, S - 1): the tokens the previous window did not reach.

    Windows go through the blocks in batches of about `batch_tokens` tokens (this bounds activation
    memory), batches in groups whose hidden states fit `hidden_budget_bytes` (this bounds how often
    the checkpoint is read); the head runs on `head_rows` positions at a time. Sums are float64.

    process_group: a torch.distributed group whose ranks all pass the same windows and options; each
    scores its share (see the module docstring). A collective: call it on every rank."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise InputError(f"perplexity needs windows of shape [w >= 1, S >= 2], got {tuple(windows.shape)}")
    if stride is not None and stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}")
    count, seq_len = windows.shape
    later = seq_len - 1 if stride is None else min(stride, seq_len - 1)
    per_batch = max(1, batch_tokens // seq_len)
    batches = list(windows.split(per_batch))
    mine = range(len(batches))
    if process_group is not None:
        mine = shard(len(batches), dist.get_rank(process_group), dist.get_world_size(process_group))
    nll = torch.zeros(count, dtype=torch.float64)  # per window; windows of other ranks stay 0
    ours = batches[mine.start : mine.stop]
    for index, hidden in stream_batches(runner, ours, hidden_budget_bytes, desc=desc, progress=progress):
        first_window = (mine.start + index) * per_batch
        for row in range(hidden.shape[0]):
            scored = seq_len - 1 if first_window + row == 0 else later
            states = hidden[row, seq_len - 1 - scored : seq_len - 1]
            targets = ours[index][row, seq_len - scored :]
            nll[first_window + row] = -target_log_probs(runner, states, targets, head_rows)[0].sum()
    if process_group is not None:
        communicate(dist.all_reduce, nll, group=process_group)  # each window's value plus zeros: exact
    tokens = seq_len - 1 + (count - 1) * later
    mean_nll = float(nll.sum()) / tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, tokens, count, seq_len, stride)
