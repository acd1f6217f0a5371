"""Packing scored rows into prefix trees, and scoring through them against one row per input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import float64_tolerance, save_tiny_checkpoint

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.evaluation import loglikelihoods, token_request
from slm_fast.evaluation.prefix_trees import PrefixTree, pack_prefix_trees, tree_layout
from slm_fast.evaluation.scoring import padded_ids
from slm_fast.runtime.stream import BlockRunner


def ancestors(tree) -> np.ndarray:
    """visible[q, k] from the packed rows' paths: k is q or comes before it in one of q's rows."""
    seen = np.zeros((len(tree), len(tree)), dtype=bool)
    for path in tree.paths.values():
        for depth, node in enumerate(path):
            seen[node, path[: depth + 1]] = True
    return seen


def test_rows_sharing_half_their_tokens_share_a_tree() -> None:
    rows = [(1, 2, 3, 5), (7, 8), (1, 2, 3, 4), (1, 2, 9, 9, 9, 9), (1, 2, 3, 4, 6)]
    trees = pack_prefix_trees(rows, max_tokens=100)
    assert [sorted(tree.paths) for tree in trees] == [
        [(1, 2, 3, 4), (1, 2, 3, 4, 6), (1, 2, 3, 5)],  # 3 of 4 shared, then a row extending another
        [(1, 2, 9, 9, 9, 9)],  # 2 of 6 shared: a tree of its own
        [(7, 8)],
    ]
    first = trees[0]
    assert first.tokens == [1, 2, 3, 4, 6, 5] and first.depths == [0, 1, 2, 3, 4, 3]
    assert first.parents == [-1, 0, 1, 2, 3, 2]
    for tree in trees:
        assert all([tree.tokens[i] for i in path] == list(row) for row, path in tree.paths.items())
        assert np.array_equal(tree.visible(), ancestors(tree))


def test_trees_stay_within_max_tokens_and_rows_are_not_split() -> None:
    context = tuple(range(10, 20))
    rows = [context + (answer,) * 3 for answer in range(4)] + [tuple(range(40))]
    trees = pack_prefix_trees(rows, max_tokens=16)
    assert [len(tree) for tree in trees] == [40, 16, 16]  # the long row alone (it sorts first); 10 + 3 x 2 twice
    assert sorted(row for tree in trees for row in tree.paths) == sorted(rows)
    lenient = pack_prefix_trees(rows, max_tokens=16, min_shared=0.0)  # any shared token would do
    assert [len(tree) for tree in lenient] == [40, 16, 16]  # ... but the long row shares none


def test_tree_layout_pads_with_tokens_that_see_only_themselves() -> None:
    trees = sorted(pack_prefix_trees([(5, 6, 7), (5, 6, 8), (9,)], max_tokens=100), key=len, reverse=True)
    assert [tree.paths for tree in trees[1:]] == [PrefixTree.of((9,)).paths]
    ids, layout = padded_ids([tree.tokens for tree in trees]), tree_layout(trees)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert layout.positions.tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]]
    assert layout.visible[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    assert layout.visible[1].int().tolist() == np.eye(4, dtype=int).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_shared_prefixes_score_as_rows_run_alone(tmp_path: Path, arch: str) -> None:
    """Multiple-choice-like requests (a context, answers of 1-4 tokens; single-token answers sharing a
    row) and a context longer than the sliding window: shared and unshared scoring agree to float64
    rounding (Gemma's norms: float32 rounding, see float64_tolerance); trees never exceed the model's
    window (qwen2: 16 on its top blocks, gemma2: 8)."""
    folder = save_tiny_checkpoint(tmp_path / arch, arch, num_layers=3, dtype=torch.float64)
    runner = BlockRunner(CheckpointReader(folder))
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for document in range(6):
        context = torch.randint(2, 128, (3 + 3 * document,), generator=generator).tolist()
        pairs += [
            (context, torch.randint(2, 128, (1 + answer % 4,), generator=generator).tolist()) for answer in range(5)
        ]
    pairs += [(list(range(2, 40)), [7, 8]), (pairs[0][0][:2], [9])]
    requests = [token_request(context, continuation, 256) for context, continuation in pairs]
    shared = loglikelihoods(runner, requests, batch_tokens=64, head_rows=7, progress=False)
    alone = loglikelihoods(runner, requests, batch_tokens=64, head_rows=7, share_prefixes=False, progress=False)
    torch.testing.assert_close(shared.loglikelihood, alone.loglikelihood, **float64_tolerance(arch, 3))
    assert torch.equal(shared.greedy, alone.greedy) and shared.rows == alone.rows
    assert alone.tokens == sum(len(r.inputs) for r in {r.inputs: r for r in requests}.values())
    window = runner.sliding_window or 64
    assert shared.tokens < alone.tokens
    trees = pack_prefix_trees({r.inputs for r in requests}, window)
    assert shared.tokens == sum(len(tree) for tree in trees) and all(
        len(tree) <= window for tree in trees if len(tree.paths) > 1
    )
