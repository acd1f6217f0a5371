"""The merged block's per-layer settings (attention type, sliding window, RoPE variant) come from the
block whose weights dominate (slm_fast.merge.settings_block), the same in the block-streamed runtime
the search uses, in the written config and in the in-memory oracle. Tiny Gemma-2 (alternating
sliding/full), Gemma-3 (five sliding, one full) and Qwen2 whose max_window_layers falls inside the
window; 12 tokens against a sliding window of 8 (16 for Qwen2, hence longer tokens there) make the
attention type change the logits."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import merge_in_memory
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.errors import InputError
from slm_fast.export import export_merged_checkpoint
from slm_fast.merge import settings_block
from slm_fast.runtime.stream import BlockRunner
from slm_fast.slm import window_block
from slm_fast.windows import output_blocks

TOKENS = torch.tensor([[(7 * i + 3) % 128 for i in range(24)]])


def test_settings_block_follows_the_dominant_weights():
    assert settings_block(2, 4, "keep_high") == settings_block(2, 4, "keep_high_norms_low") == 4
    assert settings_block(2, 4, "keep_low") == 2
    for rule in ("mean", "sum", "rdsc"):
        assert settings_block(2, 4, rule) == 2 and settings_block(2, 4, rule, "high") == 4
    with pytest.raises(InputError, match="unknown average settings 'middle'"):
        settings_block(2, 4, "mean", "middle")


def streamed_logits(source, windows, rule, average_settings):
    """Logits of the pruned model run block by block by the runtime, with the block specs the search
    builds for its candidates."""
    runner = BlockRunner(CheckpointReader(source))
    hidden = runner.embed(TOKENS)
    for window in output_blocks(windows, runner.num_blocks):
        spec = window_block(window, rule, runner.reader, average_settings)
        hidden = runner.apply(runner.block(spec), spec.layer_index, hidden)
    return runner.logits(runner.final_norm(hidden)).float()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


CASES = [
    # arch, window, rule, average_settings, expected attention type of the merged block
    ("gemma2", (1, 2), "keep_high", "low", "sliding_attention"),  # block 2 slides, block 1 is full
    ("gemma2", (1, 2), "keep_low", "low", "full_attention"),
    ("gemma2", (1, 2), "mean", "high", "sliding_attention"),
    ("gemma3", (3, 5), "keep_high", "low", "full_attention"),  # block 5 is Gemma-3's full one
    ("gemma3", (3, 5), "rdsc", "low", "sliding_attention"),
    ("gemma3", (3, 5), "keep_high_norms_low", "low", "full_attention"),
    ("qwen2", (2, 4), "keep_high", "low", "sliding_attention"),  # max_window_layers = 3 inside [2, 4]
    ("qwen2", (2, 4), "mean", "low", "full_attention"),
]


@pytest.mark.parametrize(("arch", "window", "rule", "average", "attention"), CASES)
def test_runtime_config_and_oracle_agree_on_the_merged_layer_type(tmp_path, arch, window, rule, average, attention):
    source = save_tiny_checkpoint(tmp_path / "src", arch, num_layers=6)
    result = export_merged_checkpoint(
        source, tmp_path / "out", [window], rule=rule, average_settings=average, progress=False
    )
    chosen = window[1] if attention == _type(source, window[1]) and window[0] != window[1] else window[0]
    assert result.settings_sources[window[0]] == settings_block(*window, rule, average) == chosen

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"][window[0]] == attention
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert written.config.layer_types[window[0]] == attention
    if arch == "qwen2":  # the written threshold agrees with the written types
        types = ["sliding_attention" if i >= config["max_window_layers"] else "full_attention" for i in range(4)]
        assert types == config["layer_types"]

    oracle = merge_in_memory(
        AutoModelForCausalLM.from_pretrained(source).eval(), [window], rule, settings(window, chosen)
    )
    torch.testing.assert_close(logits(written), logits(oracle), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed_logits(source, [window], rule, average), logits(written), rtol=1e-4, atol=1e-4)

    # The choice is visible: the other block's settings give another model.
    other = window[0] if chosen == window[1] else window[1]
    wrong = merge_in_memory(
        AutoModelForCausalLM.from_pretrained(source).eval(), [window], rule, settings(window, other)
    )
    assert not torch.allclose(logits(wrong), logits(written), rtol=1e-3, atol=1e-3)


def settings(window, block):
    """For the oracle: the merged window takes `block`'s settings, every other block its own."""
    return lambda lo, hi: block if (lo, hi) == window else lo


def _type(source, block):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).layer_types[block]
