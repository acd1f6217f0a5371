"""Linear compensation against a dense least-squares oracle on the whole Hugging Face model."""

import json

import pytest
import torch
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus
from transformers import AutoModelForCausalLM

from slm_fast import compensate
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.errors import InputError
from slm_fast.export import export_merged_checkpoint
from slm_fast.prune import PruneOptions, calibration_ids, prune
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.windows import output_blocks

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(7))
RIDGE = 1e-2
# Both sides run the same float32 blocks (batch shapes differ, ~1e-6 relative noise in M and R); the
# ridge bounds cond(M^T M + lam I) by (d + ridge) / ridge ~ 6.4e3 for d = 64, so T agrees to ~1e-2 in
# the worst direction and much better in the typical one; outputs through the corrected blocks agree
# to float32 noise amplified by that error on small components.
MAP_TOL = 2e-3
LOGIT_TOL = 2e-4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("comp") / "m", "llama", num_layers=8)


def dense_oracle(source, tmp_path, windows, dropped, rule):
    """The uncompensated pruned model, corrected carrier by carrier (bottom-up, each fitted on the
    already-corrected model's activations) by a dense float64 ridge least-squares solve."""
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    last = []
    hook = original.model.layers[-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        states = [*original(IDS, output_hidden_states=True).hidden_states[:-1], last[0]]
    hook.remove()
    export_merged_checkpoint(source, tmp_path / "plain", windows, dropped=dropped, rule=rule, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    plan = output_blocks(windows, 8, dropped)
    maps = {}
    for position, target in sorted(compensate.carriers(plan, 8).items()):
        layer, seen = model.model.layers[position], {}
        hooks = [
            layer.mlp.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("m", out)),
            layer.register_forward_hook(lambda m, a, out, seen=seen: seen.__setitem__("o", out)),
        ]
        with torch.no_grad():
            model(IDS)
        for h in hooks:
            h.remove()
        m = seen["m"].reshape(-1, 64).double()
        r = states[target].reshape(-1, 64).double() - (seen["o"].reshape(-1, 64).double() - m)
        lam = RIDGE * m.square().sum() / 64
        eye = torch.eye(64, dtype=torch.float64)
        t = torch.linalg.lstsq(torch.cat([m, lam.sqrt() * eye]), torch.cat([r, lam.sqrt() * eye])).solution
        maps[position] = t
        with torch.no_grad():
            w = layer.mlp.down_proj.weight
            w.copy_((t.T @ w.double()).float())
    return model, maps


CASES = [
    ([], [3, 4, 6], "keep_high"),  # SLEB / ShortGPT-like drops: carriers are blocks 2 and 5
    ([(2, 4)], [], "keep_high"),  # a merged window carries its own span
    ([(1, 2), (5, 6)], [], "mean"),  # two windows: the upper one is fitted on the corrected lower one
]


@pytest.mark.parametrize("micro_batch", [None, 3], ids=["one-chunk", "chunks-of-3"])
@pytest.mark.parametrize(("windows", "dropped", "rule"), CASES)
def test_linear_compensation_matches_a_dense_solve(source, tmp_path, monkeypatch, windows, dropped, rule, micro_batch):
    """Whole or in the cache's chunks of 3 samples (ragged: 8 = 3 + 3 + 2; a host budget of one chunk
    sends the rest of the states to disk); pieces of 2 samples within a chunk for the sums."""
    monkeypatch.setattr(compensate, "TOKENS_PER_CHUNK", 2 * 32)
    runner = BlockRunner(CheckpointReader(source), block_budget_bytes=10**9, micro_batch=micro_batch)
    cache = HiddenStateCache(host_budget_bytes=3 * 32 * 64 * 4 if micro_batch else 2**62, spill_dir=tmp_path)
    calibrate(runner, IDS, cache, progress=False)
    plan = output_blocks(windows, 8, dropped)
    result = compensate.fit_linear(runner, cache, plan, rule=rule, ridge=RIDGE, progress=False)
    assert ("compensate", 0) not in cache.store  # its running states are released
    oracle_model, oracle_maps = dense_oracle(source, tmp_path, windows, dropped, rule)
    assert sorted(result.maps) == sorted(oracle_maps)
    for position, t in oracle_maps.items():
        torch.testing.assert_close(result.maps[position].double(), t, rtol=0, atol=MAP_TOL)
        assert (t - torch.eye(64, dtype=t.dtype)).abs().max() > 50 * MAP_TOL  # a real correction
    for fit in result.fits:
        assert 0 <= fit.relative_error_after < fit.relative_error_before

    export_merged_checkpoint(
        source, tmp_path / "comp", windows, dropped=dropped, rule=rule, progress=False, block_transform=result.fold
    )
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "comp").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, oracle_model(IDS).logits, rtol=0, atol=LOGIT_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("room", [True, False], ids=["sums-on-gpu", "sums-short-of-memory"])
def test_a_cuda_fit_equals_the_cpu_fit(source, monkeypatch, room):
    """On a GPU the blocks run and the fold happens there, the sums accumulate there (or on the CPU when
    its free memory is short); the maps come back on the CPU and equal the CPU run's up to float32
    noise (the bound of the dense-solve test)."""
    windows, dropped, rule = CASES[2]
    plan = output_blocks(windows, 8, dropped)

    def fit(device):
        runner = BlockRunner(CheckpointReader(source), device, block_budget_bytes=10**9)
        cache = HiddenStateCache(device, device_budget_bytes=2**34 if device == "cuda" else 0)  # states on the GPU
        calibrate(runner, IDS, cache, progress=False)
        return compensate.fit_linear(runner, cache, plan, rule=rule, ridge=RIDGE, progress=False)

    on_cpu = fit("cpu")
    if not room:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 2**34))
    assert compensate.sums_device(torch.device("cuda"), 64, 4096).type == ("cuda" if room else "cpu")
    on_cuda = fit("cuda")
    assert sorted(on_cuda.maps) == sorted(on_cpu.maps)
    for position, t in on_cpu.maps.items():
        assert on_cuda.maps[position].device.type == "cpu"
        torch.testing.assert_close(on_cuda.maps[position], t, rtol=0, atol=MAP_TOL)


def test_solve_ridge_is_the_regularised_least_squares():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(50, 10, generator=gen, dtype=torch.float64)
    r = torch.randn(50, 10, generator=gen, dtype=torch.float64)
    t = compensate.solve_ridge(m.T @ m, m.T @ r, 0.5)
    lam = 0.5 * m.square().sum() / 10
    eye = torch.eye(10, dtype=torch.float64)
    dense = torch.linalg.lstsq(torch.cat([m, lam.sqrt() * eye]), torch.cat([r, lam.sqrt() * eye])).solution
    torch.testing.assert_close(t, dense, rtol=0, atol=1e-10)


def test_carriers():
    assert compensate.carriers(output_blocks([], 8, [3, 4, 6]), 8) == {2: 5, 3: 7}  # output 3 is block 5
    assert compensate.carriers(output_blocks([(2, 4)], 8), 8) == {2: 5}
    assert compensate.carriers(output_blocks([], 8, [6]), 8) == {5: 7}
    assert compensate.carriers(output_blocks([], 8, [7]), 8) == {6: 8}
    assert compensate.carriers(output_blocks([], 8), 8) == {}


def test_gemma_blocks_are_refused(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "g", "gemma2", num_layers=4)
    runner = BlockRunner(CheckpointReader(folder))
    cache = HiddenStateCache()
    calibrate(runner, IDS[:2, :8], cache, progress=False)
    with pytest.raises(InputError, match="down_proj"):
        compensate.fit_linear(runner, cache, output_blocks([], 4, [2]), rule="keep_high", progress=False)


def test_prune_with_compensation_end_to_end(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "src", "llama", num_layers=8)
    save_tiny_tokenizer(folder)
    write_word_corpus(tmp_path / "calib.txt")
    base = dict(calib=str(tmp_path / "calib.txt"), n_samples=4, seq_len=32, progress=False, method="sleb", remove=2)
    plain = prune(folder, tmp_path / "plain", PruneOptions(**base, compensate="none"))
    fitted = prune(folder, tmp_path / "comp", PruneOptions(**base, compensate="linear"))
    assert fitted.dropped == plain.dropped
    report = json.loads((tmp_path / "comp" / "slm_report.json").read_text())
    spans = report["compensation"]["spans"]
    assert spans and all(s["relative_error_after"] < s["relative_error_before"] for s in spans)
    # The cost report replays calibration and search exactly, and the compensation sweep apart.
    assert set(report["cost"]["replayed_over_measured"].values()) <= {
        1.0,
        report["cost"]["replayed_over_measured"]["seconds"],
    }
    assert report["compensation"]["work"]["token_forwards"] > 0 and report["compensation"]["work"]["block_loads"] >= 0
    replayed = report["cost"]["compensation"]["replayed_over_measured"]  # cost.Replay.compensation on SLEB's drops
    assert {k: replayed[k] for k in ("block_loads", "bytes_read", "token_forwards")} == dict.fromkeys(
        ("block_loads", "bytes_read", "token_forwards"), 1.0
    )
    # On its own calibration tokens the compensated model is closer to the original's final states.
    ids = calibration_ids(folder, PruneOptions(**base))

    def final_error(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[-1]

    original = final_error(folder)
    error_plain = (final_error(tmp_path / "plain") - original).square().sum()
    error_comp = (final_error(tmp_path / "comp") - original).square().sum()
    assert error_comp < error_plain
    with pytest.raises(InputError, match="compensation"):
        prune(folder, tmp_path / "bad", PruneOptions(**base, compensate="quadratic"))
