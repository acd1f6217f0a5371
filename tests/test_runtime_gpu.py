"""The out-of-core search on a CUDA device: hidden states on the GPU, in pinned host memory and on disk
meet in one sweep (the torch.cat crash this replaced), and the decisions equal the CPU run's.
Run with `python -m pytest -m gpu tests/test_runtime_gpu.py` (scripts/gpu_check.sh does)."""

import pytest
import torch
from tiny_models import save_tiny_checkpoint

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache, TieredStore
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import CandidateScorer, best_first_search

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
IDS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))


def search(folder, device, *, device_bytes, host_bytes, spill_dir, dtype=None):
    runner = BlockRunner(CheckpointReader(folder), device, dtype, micro_batch=2, block_budget_bytes=0)
    boundaries = TieredStore(device, device_bytes, host_bytes, spill_dir=spill_dir)
    plans = TieredStore(device, device_bytes, host_bytes, spill_dir=spill_dir)
    cache = HiddenStateCache(store=boundaries)
    reference = calibrate(runner, IDS, cache, progress=False)
    scorer = CandidateScorer(runner, cache, reference, criterion="cosine", rule="mean", states=plans)
    result = best_first_search(scorer, 8, target_blocks=3)
    stats = (boundaries.ledger.stats(), plans.ledger.stats())
    cache.close()
    plans.close()
    return result, stats


def test_states_from_every_tier_meet_on_the_gpu_and_decide_as_on_the_cpu(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=8)
    chunk = 2 * 32 * 64 * 4  # one micro-batch of states, float32
    cpu, _ = search(folder, "cpu", device_bytes=0, host_bytes=2**40, spill_dir=tmp_path)
    # 3 chunks on the GPU, 3 in pinned host memory, the rest on disk, for boundaries and plans alike
    gpu, (boundaries, plans) = search(folder, "cuda", device_bytes=3 * chunk, host_bytes=3 * chunk, spill_dir=tmp_path)
    for stats in (boundaries, plans):
        assert stats["peak_bytes"]["device"] > 0 and stats["peak_bytes"]["host"] > 0 and stats["disk_bytes_written"] > 0
    assert gpu.windows == cpu.windows
    assert [c.similarity for c in gpu.candidates] == pytest.approx([c.similarity for c in cpu.candidates], abs=1e-4)
    roomy, _ = search(folder, "cuda", device_bytes=2**34, host_bytes=0, spill_dir=tmp_path)
    assert [c.similarity for c in roomy.candidates] == [c.similarity for c in gpu.candidates]  # tiers: same bits


def test_pinned_host_tier_returns_states_on_the_gpu():
    store = TieredStore("cuda", device_budget_bytes=0, host_budget_bytes=2**30)
    state = torch.randn(2, 8, 16, device="cuda")
    assert store.put("s", state) == "host"
    assert store._memory["s"].is_pinned() and store._memory["s"].device.type == "cpu"
    back = store.get("s")
    assert back.device.type == "cuda" and torch.equal(back, state)


def test_bf16_compute_of_an_fp32_checkpoint(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=8)
    result, _ = search(folder, "cuda", device_bytes=2**34, host_bytes=0, spill_dir=tmp_path, dtype=torch.bfloat16)
    assert sum(hi - lo for lo, hi in result.windows) == 3
