"""Log-likelihoods of (context, continuation) requests, tokenized and batched like lm-eval-harness
(v0.4, `HFLM`) and scored block-streamed.

Tokenization: the context's trailing whitespace moves to the front of the continuation; the
concatenation is encoded once (no special tokens) and split at the context's own token count, so the
continuation tokens are those the model sees after that context. The model reads all tokens but the
last (left-truncated to `max_length`) and the last len(continuation) positions are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.evaluation.streaming import stream_batches, target_log_probs
from slm_fast.runtime.stream import BlockRunner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenRequest:
    """A scored sequence: the model reads `tokens[:-1]` and predicts the last `continuation_length`
    tokens."""

    tokens: tuple[int, ...]
    continuation_length: int

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.tokens[:-1]


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_requests(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int
) -> list[TokenRequest]:
    """TokenRequests for (context, continuation) pairs, encoded as the harness's `_encode_pair`."""
    moved = [split_trailing_space(context, continuation) for context, continuation in pairs]
    if any(not context for context, _ in moved):
        raise InputError("a request has an empty context (nothing to condition the first token on)")
    wholes = tokenizer([c + k for c, k in moved], add_special_tokens=False, verbose=False)["input_ids"]
    contexts = tokenizer([c for c, _ in moved], add_special_tokens=False, verbose=False)["input_ids"]
    requests = []
    for whole, context, (text, continuation) in zip(wholes, contexts, moved, strict=True):
        length = len(whole) - len(context)
        if length < 1 or length > max_length:
            raise InputError(
                f"continuation {continuation!r} after {text[-40:]!r} has {length} tokens (need 1..{max_length})"
            )
        requests.append(TokenRequest(tuple(whole[-(max_length + 1) :]), length))
    return requests


def loglikelihoods(
    runner: BlockRunner,
    requests: Sequence[TokenRequest],
    *,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    head_rows: int = 512,
    progress: bool = True,
    desc: str = "scoring",
) -> Tensor:
    """Summed continuation log-probabilities (float64 [len(requests)]) of every request.

    Requests with the same input tokens share one row (the harness's trick for single-token answers
    such as BoolQ's " no"/" yes"). Rows are sorted by length, longest first, and right-padded into
    batches of at most `batch_tokens` padded tokens (at least one row each): causal attention keeps
    padding after a row's tokens from affecting them, so no attention mask is needed."""
    scored_on: dict[tuple[int, ...], list[int]] = {}  # input row -> the requests it serves
    for number, request in enumerate(requests):
        scored_on.setdefault(request.inputs, []).append(number)
    batches = _pack(sorted(scored_on, key=len, reverse=True), batch_tokens)
    totals = torch.zeros(len(requests), dtype=torch.float64)
    ids = [_padded(batch) for batch in batches]
    for index, hidden in stream_batches(runner, ids, hidden_budget_bytes, desc=desc, progress=progress):
        batch_rows, positions, targets, owners = [], [], [], []
        for slot, row in enumerate(batches[index]):
            for number in scored_on[row]:
                request = requests[number]
                count = request.continuation_length
                batch_rows += [slot] * count
                positions += range(len(row) - count, len(row))
                targets += request.tokens[-count:]
                owners += [number] * count
        picked = hidden[torch.tensor(batch_rows), torch.tensor(positions)]
        log_probs = target_log_probs(runner, picked, torch.tensor(targets), head_rows)
        totals.index_add_(0, torch.tensor(owners), log_probs)
    return totals


def _pack(rows: list[tuple[int, ...]], batch_tokens: int) -> list[list[tuple[int, ...]]]:
    """Rows sorted longest first -> consecutive batches whose padded size (count x longest) stays
    within `batch_tokens`."""
    batches: list[list[tuple[int, ...]]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _padded(batch: list[tuple[int, ...]]) -> Tensor:
    """Right-padded token ids; the padding id (0) is arbitrary, its positions are never scored."""
    out = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
    for slot, row in enumerate(batch):
        out[slot, : len(row)] = torch.tensor(row)
    return out
