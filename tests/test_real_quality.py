"""SLEB, the logit criteria, compensation and healing on the real SmolLM2-135M (slow), small sizes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slm_fast.healing import HealOptions, heal
from slm_fast.prune import PruneOptions, calibration_ids, prune

pytestmark = pytest.mark.slow
SMALL = dict(n_samples=2, seq_len=64, progress=False)


def final_states(folder, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids, output_hidden_states=True).hidden_states[-1]


def test_sleb_with_compensation(smollm2, tmp_path):
    plain = prune(smollm2, tmp_path / "plain", PruneOptions(method="sleb", remove=2, **SMALL))
    fitted = prune(smollm2, tmp_path / "comp", PruneOptions(method="sleb", remove=2, compensate="linear", **SMALL))
    assert plain.dropped == fitted.dropped and 0 not in plain.dropped and 29 not in plain.dropped
    spans = json.loads((tmp_path / "comp" / "slm_report.json").read_text())["compensation"]["spans"]
    assert all(s["relative_error_after"] < s["relative_error_before"] for s in spans)
    ids = calibration_ids(smollm2, PruneOptions(remove=1, **SMALL))
    original = final_states(smollm2, ids)
    error = {name: (final_states(tmp_path / name, ids) - original).square().sum() for name in ("plain", "comp")}
    assert error["comp"] < error["plain"]


@pytest.mark.parametrize("criterion", ["kl", "ppl"])
def test_best_first_with_logit_criteria(smollm2, tmp_path, criterion):
    report = prune(smollm2, tmp_path / "out", PruneOptions(remove=1, criterion=criterion, **SMALL))
    assert report.blocks_after == 29 and report.similarity < 0


def test_heal_lora_runs(smollm2, tmp_path):
    options = HealOptions(steps=2, batch_size=1, cutoff=64, progress=False)
    report = heal(smollm2, tmp_path / "healed", options)
    assert len(report.losses) == 2 and all(0 < loss < 10 for loss in report.losses)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "healed").config.num_hidden_layers == 30
