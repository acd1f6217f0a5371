"""Token-parallel similarity (slm_fast/similarity/distributed.py): cka_matrix and StreamingCKA with
process_group= over 2, 3 and 4 gloo processes on uneven token shards equal the one-process result on the
concatenated shards, and bad input on one rank fails every rank instead of hanging.

Tolerances. float64 cases: every product is float64 in both runs; only the grouping of the float64 sums
differs (row sums split over ranks, blocks split between ranks), so CKA agrees to a few hundred ulps of
the centring terms, which for these 100-token, unit-scale layers is far below 1e-10 (the bound the
one-process streaming tests use for re-chunked sums). float32 cases: kernel entries are float32 dot
products of width <= 9 whose rounding (<= d u |x||y|, u = 6e-8) depends on the GEMM blocking, which
differs between the one-process tiles and the ring's blocks; through the centring cancellation
(HSIC about 1/30 of its largest term here) that is < 1e-5 on CKA. bfloat16 inputs are the same bf16
values in both runs and are centred and multiplied in float32, so the float32 bound applies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

from slm_fast import StreamingCKA, cka_matrix, hsic
from slm_fast.errors import InputError
from slm_fast.similarity.checks import normalize_pairs, with_diagonal
from slm_fast.similarity.linear_features import LinearFeatureState

WORKER = Path(__file__).with_name("distributed_worker.py")
SHARDS = {2: [37, 64], 3: [20, 50, 31], 4: [9, 30, 41, 21]}  # uneven; 101 tokens
TIMEOUT_S = 120


@pytest.fixture(scope="module", params=sorted(SHARDS))
def ranks(request, tmp_path_factory) -> tuple[list[int], list[dict]]:
    """Run the worker on `world` processes once; every rank's {case: result}."""
    world = request.param
    sizes = SHARDS[world]
    folder = tmp_path_factory.mktemp(f"dist{world}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(WORKER.parent)])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(r),
                str(world),
                str(folder / "init"),
                str(folder / f"out{r}.pt"),
                ",".join(map(str, sizes)),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r] if r < len(logs) else ''}"
    return sizes, [torch.load(folder / f"out{r}.pt") for r in range(world)]


def one_process(name: str, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    kind, dtype, options = worker.CASES[name]
    options = {k: v for k, v in options.items() if k != "linear_state"}
    layers = worker.data(sum(sizes), dtype)
    if kind == "rank_0_empty":
        layers = [x[sizes[0] :] for x in layers]
    if kind == "constant":
        layers = worker.constant_layers(layers, sizes)
        with pytest.warns(RuntimeWarning, match="layer 1 has constant activations"):
            return cka_matrix(layers, **options), hsic(layers, **options)
    if kind == "matrix":
        return cka_matrix(layers, **options), hsic(layers, **options)
    with StreamingCKA(len(layers), linear_state="tokens", **options) as stream:
        stream.update(layers)
        return stream.compute(), stream.compute_hsic()


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_distributed_equals_one_process(ranks, name: str) -> None:
    sizes, results = ranks
    want_cka, want_hsic = one_process(name, sizes)
    tolerance = 1e-10 if worker.CASES[name][1] == torch.float64 else 1e-5
    for rank, result in enumerate(results):
        cka, values = result[name]
        assert torch.equal(torch.isnan(cka), torch.isnan(want_cka)), f"rank {rank}: NaN pattern differs"
        assert torch.allclose(cka, want_cka, atol=tolerance, rtol=0, equal_nan=True), f"rank {rank}: {cka - want_cka}"
        assert torch.allclose(values, want_hsic, rtol=tolerance, atol=0, equal_nan=True), f"rank {rank}"
    # every rank returns the same bits
    assert all(torch.equal(r[name][0].nan_to_num(), results[0][name][0].nan_to_num()) for r in results)


def test_stream_median_sigma_reaches_across_ranks(ranks) -> None:
    """sigma_tokens = 40 spans rank 0's shard and the next one: the sigma is the one-process stream's."""
    sizes, results = ranks
    assert sizes[0] < 40
    layers = worker.data(sum(sizes))
    with StreamingCKA(3, kernel="rbf", sigma_tokens=40) as stream:
        stream.update(layers)
        sigmas = stream.sigmas
    wrong = cka_matrix(layers, "rbf", sigma=[s * 1.1 for s in sigmas])
    assert not torch.allclose(results[0]["stream_rbf_median"][0], wrong, atol=1e-6)


def test_a_subgroup_reduces_over_its_own_ranks(ranks) -> None:
    """Ranks 1 and 2 in a group of their own: the CKA of their two shards (group ranks map to global ranks)."""
    sizes, results = ranks
    if len(sizes) < 3:
        pytest.skip("needs 3 ranks")
    layers = [x[sizes[0] : sum(sizes[:3])] for x in worker.data(sum(sizes))]
    want = cka_matrix(layers, "rbf", unbiased=True)
    for rank in (1, 2):
        assert torch.allclose(results[rank]["subgroup_1_2"], want, atol=1e-10, rtol=0)


def test_bad_input_on_one_rank_fails_every_rank(ranks) -> None:
    _, results = ranks
    assert "NaN" in results[1]["nan_on_rank_1"] and "layer 2" in results[1]["nan_on_rank_1"]
    for rank, result in enumerate(results):
        if rank != 1:
            assert "rank(s) [1]" in result["nan_on_rank_1"], result["nan_on_rank_1"]


@pytest.mark.parametrize("pairs", [None, [(0, 2)]])
def test_recentred_feature_state_equals_one_shifted_from_the_start(pairs) -> None:
    """LinearFeatureState.recentred (what makes shards' states add up) against a state that used the new
    centre as its shift from the first token: the same PairStats to float64 rounding."""
    layers = worker.data(50)
    table = with_diagonal(normalize_pairs(pairs, 3))
    moved = LinearFeatureState(list(worker.WIDTHS), table, torch.float64, torch.device("cpu"))
    moved.update([x[:10] for x in layers])
    moved.update([x[10:] for x in layers])
    centers = [x.mean(0) + 0.3 for x in layers]
    direct = LinearFeatureState(list(worker.WIDTHS), table, torch.float64, torch.device("cpu"))
    direct._shift = centers
    direct.update(layers)
    got, want = moved.recentred(centers).stats(), direct.stats()
    for field in ("frob", "row_dot", "row_diag", "diag_row", "diag_dot", "totals", "diag_totals"):
        a, b = getattr(got, field), getattr(want, field)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max())), field


def test_process_group_without_init_is_a_clear_error() -> None:
    layers = worker.data(20)
    with pytest.raises(InputError, match="torch.distributed is not initialized"):
        cka_matrix(layers, process_group=object())
    with StreamingCKA(3, process_group=object()) as stream:
        stream.update(layers)
        with pytest.raises(InputError, match="torch.distributed is not initialized"):
            stream.compute()
