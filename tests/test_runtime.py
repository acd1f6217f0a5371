"""Block-streamed forward passes equal transformers' own whole-model forward, bit for bit."""

import pytest
import torch
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate

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
    merged = runner.block((1, 3), "mean")
    assert runner.block((1, 3), "mean") is merged and runner.block((1, 3), "sum") is not merged


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
