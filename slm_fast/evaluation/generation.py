"""Greedy generation, block-streamed.

Every step runs all unfinished sequences (prompt + tokens so far) through all blocks as one stream
and appends each sequence's argmax token, so a step reads each block once per group of sequences
whatever their number. There is no key/value cache: a step recomputes whole sequences. For a model
larger than memory the blocks are read again at every step (steps x blocks loads), so generation is
feasible but slow there; for a model whose blocks stay resident it costs compute only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slm_fast.evaluation.scoring import pack_rows, padded_ids
from slm_fast.evaluation.streaming import stream_batches
from slm_fast.runtime.stream import BlockRunner


@torch.inference_mode()
def greedy_generate(
    runner: BlockRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    finished: Callable[[int, list[int]], bool],
    *,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> list[list[int]]:
    """The greedy continuation of each prompt: tokens are appended until `finished(i, tokens)` (the
    caller's stop rule, e.g. an end-of-sequence token or a stop string) or `max_new_tokens[i]`."""
    generated: list[list[int]] = [[] for _ in prompts]
    active = [i for i in range(len(prompts)) if max_new_tokens[i] > 0]
    step = 0
    while active:
        rows = sorted(active, key=lambda i: len(prompts[i]) + len(generated[i]), reverse=True)
        sequences = [(*prompts[i], *generated[i]) for i in rows]
        batches = pack_rows(sequences, batch_tokens)
        owners = iter(rows)
        batch_owners = [[next(owners) for _ in batch] for batch in batches]
        ids = [padded_ids(batch) for batch in batches]
        desc = f"generating, step {step + 1}"
        for index, hidden in stream_batches(runner, ids, hidden_budget_bytes, desc=desc, progress=progress):
            ends = torch.tensor([len(row) - 1 for row in batches[index]])
            last = hidden[torch.arange(len(ends)), ends]
            tokens = runner.logits(runner.final_norm(last)).float().argmax(dim=-1).tolist()
            for owner, token in zip(batch_owners[index], tokens, strict=True):
                generated[owner].append(token)
        active = [i for i in active if len(generated[i]) < max_new_tokens[i] and not finished(i, generated[i])]
        step += 1
    return generated
