"""The pipeline on the real SmolLM2-135M (slow: builds the checkpoint, ~20 s, and runs real blocks)."""

import json

import pytest
import torch
from real_model_checks import assert_streamed_forward_equals_full_model
from reference_slm import reference_slm
from test_export import logits, merge_in_memory
from transformers import AutoModelForCausalLM

from slm_fast.export import export_merged_checkpoint
from slm_fast.prune import PruneOptions, prune

pytestmark = pytest.mark.slow


def test_streamed_forward_equals_the_full_model(smollm2):
    assert_streamed_forward_equals_full_model(smollm2, vocab_size=49152, seq_len=64)


@pytest.mark.parametrize(("windows", "rule"), [([(20, 23), (10, 12)], "keep_high"), ([(25, 28)], "mean")])
def test_merged_checkpoint_equals_the_in_memory_merge(smollm2, tmp_path, windows, rule):
    export_merged_checkpoint(smollm2, tmp_path / "out", windows, rule=rule, max_shard_bytes=200_000_000, progress=False)
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    oracle = merge_in_memory(AutoModelForCausalLM.from_pretrained(smollm2).eval(), windows, rule)
    torch.testing.assert_close(logits(written), logits(oracle), rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 3


def test_reference_preset_matches_the_reference_loop(smollm2, tmp_path):
    """Decisions on real calibration text at two thresholds (one commits two windows)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    for threshold in (0.72, 0.8):
        options = PruneOptions(threshold=threshold, preset="reference", progress=False, overwrite=True)
        report = prune(smollm2, tmp_path / "out", options)
        audit = json.loads((tmp_path / "out" / "slm_report.json").read_text())
        ids = torch.tensor(audit["calibration"]["token_ids"])
        assert ids.shape == (10, 128)
        assert report.windows == sorted(reference_slm(model, ids, threshold)), threshold
        assert report.windows
