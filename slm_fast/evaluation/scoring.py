"""Log-likelihoods of tokenized (context, continuation) requests, scored block-streamed.

The harness hands over `context_enc` and `continuation_enc`; as its `HFLM` does, the model reads
(context_enc + continuation_enc) left-truncated to `max_length` + 1 tokens, minus the last, and the
last len(continuation_enc) positions are scored. All requests of a run are scored together, so each
block is read once per group of batches (see `streaming`), not once per request; rows sharing a
context run it once (see `prefix_trees`).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.evaluation.prefix_trees import PrefixTree, pack_prefix_trees, tree_layout
from slm_fast.evaluation.streaming import stream_batches, target_log_probs
from slm_fast.runtime.stream import BlockRunner
from slm_fast.runtime.tree_attention import TreeLayout


@dataclass(frozen=True)
class TokenRequest:
    """A scored sequence: the model reads `tokens[:-1]` and predicts the last `continuation_length`
    tokens."""

    tokens: tuple[int, ...]
    continuation_length: int

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.tokens[:-1]


def token_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> TokenRequest:
    """The request the harness's HFLM scores for these encodings (left-truncated to `max_length` + 1)."""
    if not context or not continuation or len(continuation) > max_length:
        raise InputError(
            f"a request has {len(context)} context and {len(continuation)} continuation tokens "
            f"(need >= 1 and 1..{max_length})"
        )
    return TokenRequest(tuple([*context, *continuation][-(max_length + 1) :]), len(continuation))


@dataclass(frozen=True)
class Scores:
    loglikelihood: Tensor  # float64 [requests]: summed log-probability of each continuation
    greedy: Tensor  # bool [requests]: every continuation token is the argmax of its position
    rows: int  # distinct input rows (requests sharing inputs share a row)
    tokens: int  # tokens run through the blocks, padding excluded (shared prefixes count once)


def loglikelihoods(
    runner: BlockRunner,
    requests: Sequence[TokenRequest],
    *,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    head_rows: int = 512,
    share_prefixes: bool = True,
    progress: bool = True,
    desc: str = "scoring",
) -> Scores:
    """Score every request.

    Requests with the same input tokens share one row (the harness's trick for single-token answers
    such as BoolQ's " no"/" yes"); with `share_prefixes` (and a runner that supports tree attention),
    rows that share most of their tokens are packed into prefix trees run as one row (see
    `prefix_trees`). Trees are sorted by length, longest first, and right-padded into batches of at
    most `batch_tokens` padded tokens (at least one tree each): a token attends only to tokens before
    it, so padding after a row's tokens does not affect them."""
    scored_on: dict[tuple[int, ...], list[int]] = {}  # input row -> the requests it serves
    for number, request in enumerate(requests):
        scored_on.setdefault(request.inputs, []).append(number)
    if share_prefixes and runner.supports_trees:
        trees = pack_prefix_trees(scored_on, _tree_tokens(runner, batch_tokens))
    else:
        trees = [PrefixTree.of(row) for row in scored_on]
    batches = pack_rows(sorted(trees, key=len, reverse=True), batch_tokens)
    ids = [padded_ids([tree.tokens for tree in batch]) for batch in batches]
    totals = torch.zeros(len(requests), dtype=torch.float64)
    misses = torch.zeros(len(requests), dtype=torch.long)  # continuation tokens that are not the argmax

    def layout(index: int) -> TreeLayout | None:  # plain causal rows when no tree has branches
        return None if all(len(tree.paths) == 1 for tree in batches[index]) else tree_layout(batches[index])

    for index, hidden in stream_batches(runner, ids, hidden_budget_bytes, layout=layout, desc=desc, progress=progress):
        batch_rows, positions, targets, owners = [], [], [], []
        for slot, tree in enumerate(batches[index]):
            for row, path in tree.paths.items():
                for number in scored_on[row]:
                    request = requests[number]
                    count = request.continuation_length
                    batch_rows += [slot] * count
                    positions += path[len(row) - count :]
                    targets += request.tokens[-count:]
                    owners += [number] * count
        picked = hidden[torch.tensor(batch_rows), torch.tensor(positions)]
        log_probs, greedy = target_log_probs(runner, picked, torch.tensor(targets), head_rows)
        owner_ids = torch.tensor(owners)
        totals.index_add_(0, owner_ids, log_probs)
        misses.index_add_(0, owner_ids, (~greedy).long())
    return Scores(totals, misses == 0, len(scored_on), sum(len(tree) for tree in trees))


def _tree_tokens(runner: BlockRunner, batch_tokens: int) -> int:
    """The most tokens a tree may hold: a batch's, and no more than the model's sliding window (see
    `BlockRunner.sliding_window`)."""
    window = runner.sliding_window
    return batch_tokens if window is None else min(batch_tokens, window)


def pack_rows(rows: list[Sized], batch_tokens: int) -> list[list[Sized]]:
    """Rows (token sequences or trees) sorted longest first -> consecutive batches whose padded size
    (count x longest) stays within `batch_tokens`."""
    batches: list[list[Sized]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def padded_ids(batch: Sequence[Sequence[int]]) -> Tensor:
    """Right-padded token ids; the padding id (0) is arbitrary, its positions are never scored."""
    out = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
    for slot, row in enumerate(batch):
        out[slot, : len(row)] = torch.tensor(row)
    return out
