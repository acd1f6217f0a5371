"""Checks shared by the tests on real checkpoints (SmolLM2, Qwen2.5)."""

import torch
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate


def assert_streamed_forward_equals_full_model(folder, vocab_size: int, seq_len: int) -> None:
    """The block-streamed pass gives bit-identical final hidden states and logits to `from_pretrained`."""
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
    runner = BlockRunner(CheckpointReader(folder))
    final = calibrate(runner, ids, HiddenStateCache(), progress=False)
    assert torch.equal(final, full.hidden_states[-1])
    assert torch.equal(runner.logits(final), full.logits)
