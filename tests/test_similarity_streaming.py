"""StreamingCKA: chunked updates equal the one-shot result, the sigma policy of the stream, the token
stores, the linear state switch and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_fast import StreamingCKA, cka_matrix, hsic
from slm_fast.errors import InputError
from slm_fast.similarity.sigma import median_heuristic_sigmas
from slm_fast.similarity.token_store import DiskTokenStore, MemoryTokenStore


def activations(n: int, widths: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    out = []
    for a, width in enumerate(widths):
        mix = torch.randn(5, width, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, width, generator=generator, dtype=torch.float64)
        out.append((torch.sin(latent @ mix) + 0.4 * (a + 1) * noise + 2.0).to(dtype))
    return out


def feed(stream: StreamingCKA, layers: list[torch.Tensor], sizes: list[int]) -> None:
    start = 0
    for size in sizes:
        stream.update([x[start : start + size] for x in layers])
        start += size
    assert start == layers[0].shape[0]


SIZES = [1, 0, 7, 30, 2, 45, 15]  # 100 tokens in uneven chunks, one of them empty


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(
    ("kernel", "store", "linear_state"),
    [
        ("linear", "memory", "tokens"),
        ("linear", "disk", "tokens"),
        ("linear", "memory", "features"),
        ("linear", "memory", "auto"),
        ("rbf", "memory", "auto"),
        ("rbf", "disk", "auto"),
    ],
)
def test_chunked_updates_equal_one_shot(kernel: str, store: str, linear_state: str, unbiased: bool, tmp_path) -> None:
    layers = activations(100, (6, 3, 8), seed=1)
    sigma = [1.5, 2.0, 2.5] if kernel == "rbf" else None
    with StreamingCKA(
        3,
        kernel=kernel,
        sigma=sigma,
        unbiased=unbiased,
        store=store,
        store_dir=tmp_path,
        linear_state=linear_state,
        flush_tokens=16,
        block_size=8,
    ) as stream:
        feed(stream, layers, SIZES)
        ours = stream.compute()
        expected_state = "features" if kernel == "linear" and linear_state != "tokens" else "tokens"
        assert stream.state == expected_state and stream.num_tokens == 100
    want = cka_matrix(layers, kernel, sigma, unbiased)
    assert torch.allclose(ours, want, atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(0, 60), min_size=1, max_size=5),
    kernel=st.sampled_from(["linear", "rbf"]),
    flush=st.integers(1, 40),
)
def test_any_chunking_equals_one_shot(seed: int, cuts: list[int], kernel: str, flush: int) -> None:
    layers = activations(60, (4, 2), seed=seed)
    bounds = sorted({0, 60, *cuts})
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    stream = StreamingCKA(2, kernel=kernel, sigma=1.0 if kernel == "rbf" else None, flush_tokens=flush, block_size=16)
    feed(stream, layers, sizes)
    sigma = 1.0 if kernel == "rbf" else None
    assert torch.allclose(stream.compute(), cka_matrix(layers, kernel, sigma), atol=1e-10, rtol=0)
    assert torch.allclose(stream.compute_hsic(), hsic(layers, kernel, sigma), rtol=1e-10, atol=0)


def test_compute_between_updates_and_float32_input() -> None:
    layers = activations(80, (5, 5), seed=2, dtype=torch.float32)
    stream = StreamingCKA(2, kernel="rbf", sigma=2.0, flush_tokens=10)
    feed(stream, [x[:40] for x in layers], [40])
    assert torch.allclose(stream.compute(), cka_matrix([x[:40] for x in layers], "rbf", 2.0), atol=1e-6)
    feed(stream, [x[40:] for x in layers], [25, 15])
    assert torch.allclose(stream.compute(), cka_matrix(layers, "rbf", 2.0), atol=1e-6)


def test_median_sigma_of_a_short_stream_equals_one_shot() -> None:
    layers = activations(90, (4, 6), seed=3)
    stream = StreamingCKA(2, kernel="rbf", sigma_scale=0.5, sigma_tokens=200)
    feed(stream, layers, [50, 40])
    assert stream.sigmas is None  # pairing waits for sigma, which waits for 200 tokens or compute()
    ours = stream.compute()
    assert stream.sigmas == median_heuristic_sigmas(layers, sigma_scale=0.5)
    assert torch.allclose(ours, cka_matrix(layers, "rbf", sigma_scale=0.5), atol=1e-10, rtol=0)


def test_median_sigma_of_a_long_stream_uses_the_first_tokens() -> None:
    layers = activations(150, (4, 6), seed=4)
    stream = StreamingCKA(2, kernel="rbf", sigma_tokens=64, median_diagonal=True, seed=5, flush_tokens=8)
    feed(stream, layers, [30, 30, 90])
    first = [x[:64] for x in layers]
    assert stream.sigmas == median_heuristic_sigmas(first, include_diagonal=True, seed=5)
    assert torch.allclose(stream.compute(), cka_matrix(layers, "rbf", sigma=stream.sigmas), atol=1e-10, rtol=0)


def test_pairs_and_constant_layers_follow_the_one_shot_policy() -> None:
    layers = activations(40, (3, 3, 3), seed=6)
    layers[2] = torch.full_like(layers[2], -1.0)
    stream = StreamingCKA(3, pairs=[(0, 1), (1, 2)], linear_state="tokens")
    feed(stream, layers, [13, 27])
    with pytest.warns(RuntimeWarning, match="layer 2 has constant activations"):
        ours = stream.compute()
    with pytest.warns(RuntimeWarning, match="layer 2 has constant activations"):
        want = cka_matrix(layers, pairs=[(0, 1), (1, 2)])
    assert torch.equal(torch.isnan(ours), torch.isnan(want))
    assert math.isclose(float(ours[0, 1]), float(want[0, 1]), abs_tol=1e-10)


def test_linear_auto_switches_at_break_even_only_when_it_fits() -> None:
    layers = activations(400, (4, 4), seed=7)
    stream = StreamingCKA(2, flush_tokens=8)  # break-even n* = 2 * 3 * 16 / (2 * (8 + 4)) = 4 tokens
    feed(stream, layers, [5, 395])
    assert stream.state == "features"
    tight = StreamingCKA(2, state_bytes=100, flush_tokens=8)
    feed(tight, layers, [5, 395])
    assert tight.state == "tokens"
    assert torch.allclose(stream.compute(), tight.compute(), atol=1e-10, rtol=0)


def test_disk_store_is_removed_on_close(tmp_path) -> None:
    layers = activations(30, (3, 2), seed=8, dtype=torch.bfloat16)
    with StreamingCKA(2, kernel="rbf", sigma=1.0, store="disk", store_dir=tmp_path) as stream:
        feed(stream, layers, [10, 20])
        folders = list(tmp_path.iterdir())
        assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["layer0.bin", "layer1.bin"]
        stream.compute()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_token_stores_round_trip(kind: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("slm_fast.similarity.token_store.SEGMENT_TOKENS", 16)
    widths = [3, 5]
    store = MemoryTokenStore(widths, torch.bfloat16, torch.device("cpu"))
    if kind == "disk":
        store = DiskTokenStore(widths, torch.bfloat16, torch.device("cpu"), tmp_path)
    layers = activations(70, tuple(widths), seed=9, dtype=torch.bfloat16)
    for s, e in ((0, 1), (1, 10), (10, 40), (40, 70)):
        chunk = [x[s:e].clone() for x in layers]
        store.append(chunk)
        chunk[0].zero_()  # the store keeps its own copy
    for a, x in enumerate(layers):
        assert torch.equal(store.read(a, 0, 70), x)
        assert torch.equal(store.read(a, 13, 50), x[13:50])
    assert store.ranges(40) == [(0, 16), (16, 32), (32, 40)]
    store.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, x: s.update(x[:1]), "update 0: 1 layers, expected 2"),
        (lambda s, x: s.update([x[0], x[1][:5]]), "update 0: layer 1 holds 5 tokens"),
        (lambda s, x: (s.update(x), s.update([x[0], x[1][:, :2]])), r"update 1: layer 1 is \[2\]"),
        (lambda s, x: (s.update(x), s.update([x[0], x[1].float()])), "update 1: layer 1 is .* torch.float32"),
        (lambda s, x: s.update([x[0], x[1].index_fill(0, torch.tensor([3]), math.nan)]), "update 0: layer 1 holds NaN"),
        (lambda s, x: (s.update([y[:3] for y in x]), s.compute()), "after 3 tokens; the unbiased estimator needs"),
    ],
)
def test_bad_updates_raise_named_errors(call, message: str) -> None:
    layers = activations(10, (3, 4), seed=10)
    with pytest.raises(InputError, match=message):
        call(StreamingCKA(2, unbiased=True), layers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"store": "cloud"}, "store must be"),
        ({"linear_state": "dense"}, "linear_state must be"),
        ({"kernel": "rbf", "sigma": [1.0]}, "sigma holds 1 values for 2 layers"),
        ({"pairs": [(0, 5)]}, "names a layer outside"),
        ({"sigma_tokens": 1}, "sigma_tokens must be >= 2"),
    ],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        StreamingCKA(2, **kwargs)
