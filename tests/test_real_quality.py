"""SLEB, the logit criteria, compensation and healing on the real SmolLM2-135M and (when its parts are
installed) Qwen2.5-Coder-0.5B, the second architecture with attention biases and an untied head
(slow), small sizes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slm_fast.healing import HealOptions, heal
from slm_fast.prune import PruneOptions, calibration_ids, prune

pytestmark = pytest.mark.slow
SMALL = dict(n_samples=2, seq_len=64, progress=False)


@pytest.fixture(params=["smollm2", "qwen25"])
def real_model(request):
    """Each real model's float32 checkpoint (conftest builds it once per session)."""
    return request.getfixturevalue(request.param)


def num_blocks(folder) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def final_states(folder, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids, output_hidden_states=True).hidden_states[-1]


def test_sleb_with_compensation(real_model, tmp_path):
    plain = prune(real_model, tmp_path / "plain", PruneOptions(method="sleb", remove=2, compensate="none", **SMALL))
    fitted = prune(real_model, tmp_path / "comp", PruneOptions(method="sleb", remove=2, compensate="linear", **SMALL))
    last = num_blocks(real_model) - 1
    assert plain.dropped == fitted.dropped and 0 not in plain.dropped and last not in plain.dropped
    spans = json.loads((tmp_path / "comp" / "slm_report.json").read_text())["compensation"]["spans"]
    assert all(s["relative_error_after"] < s["relative_error_before"] for s in spans)
    ids = calibration_ids(real_model, PruneOptions(remove=1, **SMALL))
    original = final_states(real_model, ids)
    error = {name: (final_states(tmp_path / name, ids) - original).square().sum() for name in ("plain", "comp")}
    assert error["comp"] < error["plain"]


@pytest.mark.parametrize("criterion", ["kl", "ppl"])
def test_best_first_with_logit_criteria(real_model, tmp_path, criterion):
    report = prune(real_model, tmp_path / "out", PruneOptions(method="slm", remove=1, criterion=criterion, **SMALL))
    assert report.blocks_after == num_blocks(real_model) - 1 and report.similarity < 0


@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_heal_runs(real_model, tmp_path, mode):
    options = HealOptions(mode=mode, steps=2, batch_size=1, cutoff=64, progress=False)
    report = heal(real_model, tmp_path / "healed", options)
    assert len(report.losses) == 2 and all(0 < loss < 10 for loss in report.losses)
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert healed.config.num_hidden_layers == num_blocks(real_model)
