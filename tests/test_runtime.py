"""Block-streamed forward passes equal transformers' own whole-model forward, bit for bit."""

import random

import pytest
import torch
from tiny_models import float64_tolerance, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache, TieredStore
from slm_fast.runtime.residency import PlannedResidency
from slm_fast.runtime.stream import BlockRunner, BlockSpec, calibrate
from slm_fast.runtime.tree_attention import TreeLayout

IDS = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))  # 40 > qwen2's window of 16


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_streamed_forward_equals_full_model(tmp_path, arch):
    folder = save_tiny_checkpoint(tmp_path / arch, arch, num_layers=5)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        full = model(IDS, output_hidden_states=True)
    runner = BlockRunner(CheckpointReader(folder))
    cache = HiddenStateCache()
    final = calibrate(runner, IDS, cache, progress=False)
    assert torch.equal(final, full.hidden_states[-1])
    assert torch.equal(runner.logits(final), full.logits)
    for boundary in range(5):  # HF's hidden_states[i] is the input of block i
        assert torch.equal(cache.get(boundary), full.hidden_states[boundary])
    assert runner.blocks_loaded == 5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3", "phi3"])
def test_tree_rows_equal_their_sequences_run_alone(tmp_path, arch):
    """Two rows, each a prefix shared by two or three branches: every token's output equals its
    output in its own sequence (float64; the sums differ only in masked terms, so to rounding: float32
    rounding in Gemma's norms, see float64_tolerance)."""
    folder = save_tiny_checkpoint(tmp_path / arch, arch, num_layers=3, dtype=torch.float64)
    runner = BlockRunner(CheckpointReader(folder), micro_batch=1)  # the layout is sliced per micro-batch
    tokens = IDS[0].tolist()
    trees = [  # (prefix, branches): the row is prefix + branch 1 + branch 2 + ...
        (tokens[:4], [tokens[4:7], tokens[7:8]]),
        (tokens[10:12], [tokens[12:13], tokens[13:15], tokens[15:18]]),
    ]
    width = max(len(p) + sum(map(len, b)) for p, b in trees)
    ids = torch.zeros(2, width, dtype=torch.long)
    positions = torch.zeros(2, width, dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(2, 1, 1)
    alone = []  # (row, index in the row, sequence, index in the sequence)
    for row, (prefix, branches) in enumerate(trees):
        n = len(prefix)
        ids[row, :n], positions[row, :n] = torch.tensor(prefix), torch.arange(n)
        visible[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for branch in branches:
            stop = start + len(branch)
            ids[row, start:stop], positions[row, start:stop] = torch.tensor(branch), torch.arange(n, n + len(branch))
            visible[row, start:stop, :n] = True
            visible[row, start:stop, start:stop] = torch.ones(len(branch), len(branch), dtype=torch.bool).tril()
            alone += [(row, start + k, prefix + branch, n + k) for k in range(len(branch))]
            start = stop
    tree = TreeLayout(positions, visible)
    hidden = runner.embed(ids)
    for index in range(runner.num_blocks):
        hidden = runner.apply(runner.block(index), index, hidden, tree)
    for row, column, sequence, position in alone:
        expected = runner.final_hidden(torch.tensor([sequence]))[0, position]
        torch.testing.assert_close(runner.final_norm(hidden[row, column]), expected, **float64_tolerance(arch, 3))


def test_tree_support_follows_the_attention_implementation(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "g", "gemma2", num_layers=2)
    runner = BlockRunner(CheckpointReader(folder))
    assert runner.supports_trees and runner.sliding_window == 8
    runner.parts.config._attn_implementation = "flash_attention_2"  # builds no mask from mask functions
    assert not runner.supports_trees
    llama = BlockRunner(CheckpointReader(save_tiny_checkpoint(tmp_path / "l", "llama", num_layers=2)))
    assert llama.sliding_window is None


def test_micro_batches_and_bf16(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=3, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    runner = BlockRunner(CheckpointReader(folder), micro_batch=1)
    assert runner.dtype == torch.bfloat16
    with torch.no_grad():
        expected = torch.cat([model(ids[None], output_hidden_states=True).hidden_states[-1] for ids in IDS])
    assert torch.equal(runner.final_hidden(IDS), expected)


def test_resident_blocks_respect_the_budget(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=4)
    reader = CheckpointReader(folder)
    one_block = reader.block_nbytes(0)
    runner = BlockRunner(reader, block_budget_bytes=2 * one_block)
    runner.final_hidden(IDS)
    runner.final_hidden(IDS)  # only 2 of 4 blocks fit: LRU order evicts each before its reuse
    assert runner.blocks_loaded == 8
    runner = BlockRunner(reader, block_budget_bytes=4 * one_block)
    runner.final_hidden(IDS)
    runner.final_hidden(IDS)
    assert runner.blocks_loaded == 4
    mean = BlockSpec("mean 1-3", 1, (1, 2, 3), lambda read: _mean([read(1), read(2), read(3)]))
    merged = runner.block(mean)
    assert runner.block(mean) is merged and runner.block(BlockSpec("other", 1, (1, 3), mean.tensors)) is not merged


def _mean(blocks):
    return {name: sum(b[name].float() for b in blocks) / len(blocks) for name in blocks[0]}


def test_planned_residency_keeps_a_fixed_set_across_sweeps(tmp_path):
    """LRU gets no hit when a sweep over four blocks repeats with room for two; the planned choice
    keeps two resident (the ones reused soonest) and reads only the other two again."""
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=4)
    reader = CheckpointReader(folder)
    runner = BlockRunner(reader, block_budget_bytes=2 * reader.block_nbytes(0))
    first = runner.final_hidden(IDS)
    for _ in range(3):
        runner.plan([BlockSpec.original(i) for i in range(4)])
        assert torch.equal(runner.final_hidden(IDS), first)
    assert runner.blocks_loaded == 4 + 2 + 2 + 2  # the first pass is unplanned (LRU)
    assert runner.bytes_read == sum(reader.block_nbytes(i) for i in range(4)) * 10 // 4


def test_prefetch_changes_nothing_but_the_waiting(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=4)
    results = {}
    for prefetch in (False, True):
        runner = BlockRunner(CheckpointReader(folder), prefetch=prefetch)
        runner.plan([BlockSpec.original(i) for i in range(4)])
        results[prefetch] = (runner.final_hidden(IDS), runner.blocks_loaded)
        runner.close()
    assert torch.equal(results[True][0], results[False][0]) and results[True][1] == results[False][1] == 4


@pytest.mark.parametrize("seed", range(5))
def test_planned_residency_is_optimal_on_random_sequences(seed):
    """With the whole future announced, misses equal Belady's optimum computed by brute force."""
    rng = random.Random(seed)
    sequence = [rng.randrange(5) for _ in range(12)]
    policy = PlannedResidency(budget_bytes=2)
    policy.plan(sequence + sequence)  # the second half is what the policy's "repeat" assumes anyway
    misses = 0
    for key in sequence:
        if not policy.access(key):
            misses += 1
            policy.admit(key, 1)
    assert misses == _optimal_misses(sequence, 2)


def _optimal_misses(sequence, capacity):
    best = {frozenset(): 0}
    for key in sequence:
        nxt = {}
        for held, misses in best.items():
            if key in held:
                options = [(held, misses)]
            else:
                options = [(held, misses + 1)]  # not kept
                if len(held) < capacity:
                    options.append((held | {key}, misses + 1))
                options += [((held - {out}) | {key}, misses + 1) for out in held]
            for state, m in options:
                nxt[state] = min(m, nxt.get(state, m))
        best = nxt
    return min(best.values())


def test_tiered_store_places_by_budget_and_returns_on_the_device(tmp_path):
    store = TieredStore("cpu", device_budget_bytes=10**6, host_budget_bytes=80, spill_dir=tmp_path)
    tensors = {k: torch.randn(2, 5, dtype=torch.float32) for k in "abc"}
    assert [store.put(k, t) for k, t in tensors.items()] == ["host", "host", "disk"]  # no device tier on CPU
    store.discard("a")
    assert store.put("d", torch.ones(2, 5)) == "host"  # the freed room is reused
    back = store.get("c")
    assert torch.equal(back, tensors["c"]) and back.device.type == "cpu"
    stats = store.ledger.stats()
    assert stats["disk_bytes_written"] == stats["disk_bytes_read"] == 40 and stats["peak_bytes"]["host"] == 80
    store.put("c", torch.zeros(2, 5))  # replacing a disk entry removes its file
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    view = torch.arange(100.0)[:10]
    store.discard("b")
    store.put("v", view)  # a view is stored as its own bytes, not its base's
    assert store._memory["v"].untyped_storage().nbytes() == 40
    store.close()
    assert not list(tmp_path.rglob("*.safetensors"))


def test_hidden_cache_spills_to_disk(tmp_path):
    cache = HiddenStateCache(host_budget_bytes=2 * 4 * 10, spill_dir=tmp_path)  # two of four fit
    tensors = [torch.randn(2, 5) + i for i in range(4)]
    for i, t in enumerate(tensors):
        cache.put(i, t)
    assert cache.placement() == {"device": 0, "host": 80, "disk": 80}
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    for i, t in enumerate(tensors):
        assert torch.equal(cache.get(i), t)
    with pytest.raises(KeyError, match="boundary 9 is not cached"):
        cache.get(9)
    cache.close()
    assert not list(tmp_path.rglob("*.safetensors"))
