"""The pipeline on the real Qwen2.5-Coder-0.5B (slow, optional: the second architecture, with attention
biases and an untied head; skipped unless `scripts/setup.sh --qwen` installed its parts)."""

import pytest
import torch
from test_export import logits, merge_in_memory
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.export import export_merged_checkpoint
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate

pytestmark = pytest.mark.slow


def test_streamed_forward_equals_the_full_model(qwen25):
    ids = torch.randint(0, 151_000, (2, 32), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(qwen25).eval()
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
    runner = BlockRunner(CheckpointReader(qwen25))
    final = calibrate(runner, ids, HiddenStateCache(), progress=False)
    assert torch.equal(final, full.hidden_states[-1])
    assert torch.equal(runner.logits(final), full.logits)


def test_merged_checkpoint_equals_the_in_memory_merge(qwen25, tmp_path):
    windows, rule = [(18, 20), (5, 6)], "rdsc"
    export_merged_checkpoint(qwen25, tmp_path / "out", windows, rule=rule, progress=False)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert written.config.num_hidden_layers == 21
    oracle = merge_in_memory(AutoModelForCausalLM.from_pretrained(qwen25).eval(), windows, rule)
    torch.testing.assert_close(logits(written), logits(oracle), rtol=1e-4, atol=1e-4)
