"""Block-streamed forward passes over many token batches, and the head applied to chosen positions.

A model larger than memory is scored by loading each block once per *group* of batches: every batch
of a group goes through block 0, then every batch through block 1, and so on. Groups are as large as
a budget for their hidden states allows, so the checkpoint is read (number of groups) times in all.
The head's logits (vocabulary x tokens) are never formed for a whole batch: only for the positions
whose next token is scored, a chunk of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from slm_fast.runtime.stream import BlockRunner
from slm_fast.runtime.tree_attention import TreeLayout


def plan_groups(batch_tokens: Sequence[int], bytes_per_token: int, budget_bytes: int) -> list[list[int]]:
    """Consecutive batch indices grouped so that each group's hidden states (`batch_tokens[i]` tokens
    of `bytes_per_token` each) fit `budget_bytes`; a batch larger than the budget is a group alone."""
    groups: list[list[int]] = []
    used = budget_bytes + 1  # forces a new group for the first batch
    for index, tokens in enumerate(batch_tokens):
        size = tokens * bytes_per_token
        if used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def stream_batches(
    runner: BlockRunner,
    batches: Sequence[Tensor],
    hidden_budget_bytes: int,
    *,
    layout: Callable[[int], TreeLayout | None] | None = None,
    desc: str = "blocks",
    progress: bool = True,
) -> Iterator[tuple[int, Tensor]]:
    """Yield (batch index, output of the last block) for every batch of token ids [B, S], in order;
    `layout(i)`, when given and not None, lays prefix trees out in batch i's rows (tree attention). It
    is called when batch i's group starts and dropped with it: a layout holds B x S x S flags, too many
    to keep for every batch of a long run.

    The outputs are the last block's hidden states before the final norm (the norm acts per token, so
    callers normalise only the rows they score)."""
    bytes_per_token = runner.parts.config.hidden_size * runner.dtype.itemsize
    groups = plan_groups([b.numel() for b in batches], bytes_per_token, hidden_budget_bytes)
    bar = tqdm(total=len(groups) * runner.num_blocks, desc=desc, unit="block", disable=not progress, leave=False)
    try:
        for group in groups:
            hidden = {index: runner.embed(batches[index]) for index in group}
            trees = {index: layout(index) if layout else None for index in group}
            trees = {index: None if tree is None else tree.to(runner.device) for index, tree in trees.items()}
            for block_index in range(runner.num_blocks):
                block = runner.block(block_index)
                for index in group:
                    hidden[index] = runner.apply(block, block_index, hidden[index], trees[index])
                bar.update()
            for index in group:
                yield index, hidden.pop(index)
    finally:
        bar.close()


@torch.inference_mode()
def target_log_probs(runner: BlockRunner, rows: Tensor, targets: Tensor, head_rows: int) -> tuple[Tensor, Tensor]:
    """(log p(targets[n] | rows[n]) in float64, whether targets[n] is the argmax) for last-block outputs
    `rows` [N, d]: final norm, head and a float32 log-softmax, `head_rows` rows at a time."""
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    greedy = torch.empty(rows.shape[0], dtype=torch.bool)
    targets = targets.to(runner.device)
    for start in range(0, rows.shape[0], head_rows):
        stop = start + head_rows
        logits = runner.logits(runner.final_norm(rows[start:stop])).float()
        picked = logits.gather(1, targets[start:stop, None]).squeeze(1) - logits.logsumexp(dim=1)
        out[start:stop] = picked.double().cpu()
        greedy[start:stop] = (logits.argmax(dim=1) == targets[start:stop]).cpu()
    return out, greedy
