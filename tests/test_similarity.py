"""cka_matrix and hsic against the n x n oracles, their properties, the sigma policy and bad input."""

from __future__ import annotations

import math
import warnings

import cka_oracle as oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slm_fast import cka_matrix, hsic
from slm_fast.errors import InputError
from slm_fast.similarity import resolve_sigmas
from slm_fast.similarity.sigma import median_heuristic_sigmas, sample_pairs


def related_layers(
    n: int, widths: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Layers that share a latent signal (CKA well inside (0, 1)) and have non-zero means."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    out = []
    for a, width in enumerate(widths):
        mix = torch.randn(6, width, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, width, generator=generator, dtype=torch.float64)
        out.append((torch.tanh(latent @ mix) + (0.3 + 0.2 * a) * noise + 1.5).to(dtype))
    return out


def as_double(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.double() for x in layers]


# The float32 target of every backend against the float64 oracle (derivation in test_similarity_offsets.py).
FP32_TOLERANCE = 1e-5
ATOL = {torch.float64: 1e-11, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


@pytest.mark.parametrize("dtype", list(ATOL))
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_and_hsic_match_the_n_by_n_oracle(kernel: str, unbiased: bool, dtype: torch.dtype) -> None:
    layers = related_layers(45, (7, 12, 3, 9), seed=1, dtype=dtype)  # 45 tokens: no multiple of the tile
    sigmas = resolve_sigmas(layers) if kernel == "rbf" else None
    ours = cka_matrix(layers, kernel=kernel, sigma=sigmas, unbiased=unbiased, block_size=16)
    want = oracle.cka_matrix(as_double(layers), kernel, sigmas, unbiased)
    assert ours.dtype == torch.float64 and ours.shape == (4, 4)
    assert torch.allclose(ours, want, atol=ATOL[dtype], rtol=0)
    raw = hsic(layers, kernel=kernel, sigma=sigmas, unbiased=unbiased, block_size=16)
    want_raw = oracle.hsic_matrix(as_double(layers), kernel, sigmas, unbiased)
    assert torch.allclose(raw, want_raw, rtol=10 * ATOL[dtype], atol=0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_smallest_unbiased_case_and_single_layer(kernel: str) -> None:
    four = related_layers(4, (3, 5), seed=2, dtype=torch.float64)
    sigmas = [1.3, 0.7] if kernel == "rbf" else None
    assert torch.allclose(
        cka_matrix(four, kernel, sigmas, unbiased=True), oracle.cka_matrix(four, kernel, sigmas, True)
    )
    single = related_layers(30, (5,), seed=3)
    assert cka_matrix(single, kernel).tolist() == [[1.0]]
    stacked = torch.stack(related_layers(20, (6, 6, 6), seed=4))  # the [L, n, d] form
    assert torch.allclose(cka_matrix(stacked, kernel), cka_matrix(list(stacked), kernel), atol=0, rtol=0)


def test_oracle_estimators_agree() -> None:
    """Song et al.'s formula equals Szekely-Rizzo U-centering (what Kornblith's unbiased CKA uses)."""
    x, y = related_layers(12, (4, 6), seed=5, dtype=torch.float64)
    k, l = oracle.gram_rbf(x, 1.1), oracle.gram_linear(y)
    assert torch.allclose(oracle.hsic_unbiased(k, l), oracle.hsic_u_centered(k, l), rtol=1e-12)


def test_requested_pairs_leave_the_rest_nan() -> None:
    layers = related_layers(30, (4, 5, 6, 7), seed=6)
    full = cka_matrix(layers, "rbf", sigma=2.0)
    band = cka_matrix(layers, "rbf", sigma=2.0, pairs=[(1, 0), (2, 1)])  # either orientation
    computed = torch.zeros(4, 4, dtype=torch.bool)
    for a, b in [(0, 1), (1, 2), (0, 0), (1, 1), (2, 2)]:
        computed[a, b] = computed[b, a] = True
    assert torch.isnan(band[~computed]).all()  # layer 3 is in no pair: even its diagonal is NaN
    # Both are float32 evaluations staging different layers, so their roundings differ: each is within
    # the float32 tolerance (derived in test_similarity_offsets.py) of the float64 oracle.
    want = oracle.cka_matrix(as_double(layers), "rbf", [2.0] * 4, False)
    assert torch.allclose(full, want, atol=FP32_TOLERANCE, rtol=0)
    assert torch.allclose(band[computed], want[computed], atol=FP32_TOLERANCE, rtol=0)
    assert torch.isnan(hsic(layers, pairs=[(0, 2)])[3, 3])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(4, 40),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    kernel=st.sampled_from(["linear", "rbf"]),
    unbiased=st.booleans(),
)
def test_properties(seed: int, n: int, widths: list[int], kernel: str, unbiased: bool) -> None:
    layers = related_layers(n, tuple(widths), seed=seed, dtype=torch.float64)
    layers[0] = layers[0] + 1e-3 * torch.arange(n, dtype=torch.float64)[:, None]  # never constant
    sigmas = [1.5] * len(widths) if kernel == "rbf" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random tiny layers may be degenerate
        ours = cka_matrix(layers, kernel, sigmas, unbiased, block_size=8)
        want = oracle.cka_matrix(layers, kernel, sigmas, unbiased)
    defined = ~torch.isnan(want)
    assert torch.equal(defined, ~torch.isnan(ours)) or not defined.all()
    assert torch.allclose(ours[defined], want[defined], atol=1e-8, rtol=0)
    assert torch.equal(ours.nan_to_num(), ours.T.nan_to_num())
    assert (ours[~torch.isnan(ours)].abs() <= 1 + 1e-9).all()


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariances(kernel: str, unbiased: bool) -> None:
    """Orthogonal transforms, isotropic scaling and translation of one layer leave CKA unchanged (RBF with
    the median heuristic, whose sigma scales with the data)."""
    layers = related_layers(60, (8, 8, 5), seed=7)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(8)))
    before = cka_matrix(layers, kernel, unbiased=unbiased)
    for transformed in (layers[0] @ q, 3.7 * layers[0], layers[0] - 4.0):
        after = cka_matrix([transformed, *layers[1:]], kernel, unbiased=unbiased)
        assert torch.allclose(after, before, atol=2e-6, rtol=0)


def test_rbf_tends_to_linear_as_sigma_grows() -> None:
    """|CKA_rbf - CKA_linear| shrinks like 1 / sigma^2 (Alvarez 2021). Larger sigmas are not shown: their
    HSIC sinks below float64's resolution of the uncentred kernel sums, which cka_matrix warns about."""
    layers = related_layers(50, (6, 9, 4), seed=9, dtype=torch.float64)
    linear = cka_matrix(layers, "linear")
    gaps = [float((cka_matrix(layers, "rbf", sigma_scale=scale) - linear).abs().max()) for scale in (3, 10, 30)]
    assert gaps[0] > 1e-3 and gaps[2] < 1e-3
    assert gaps[0] > 5 * gaps[1] > 25 * gaps[2]
    with pytest.warns(RuntimeWarning, match="significant digits"):
        cka_matrix(layers, "rbf", sigma_scale=1000)


def test_float32_keeps_concentrated_rbf_distances_exact() -> None:
    """Wide random layers: all distances are close to each other, so HSIC is a small part of the
    uncentred kernel sums; fp32 tiles still match the float64 oracle."""
    generator = torch.Generator().manual_seed(10)
    shared = torch.randn(300, 256, generator=generator)
    layers = [shared + 0.7 * torch.randn(300, 256, generator=generator) for _ in range(2)]
    sigmas = resolve_sigmas(layers)
    ours = cka_matrix(layers, "rbf", sigmas, block_size=64)
    assert torch.allclose(ours, oracle.cka_matrix(as_double(layers), "rbf", sigmas, False), atol=1e-6, rtol=0)


def test_median_heuristic_matches_the_references() -> None:
    x = related_layers(40, (5,), seed=11)[0]
    kornblith = median_heuristic_sigmas([x], sigma_scale=0.5, include_diagonal=True)[0]
    assert math.isclose(kornblith, oracle.kornblith_sigma(x, threshold=0.5), rel_tol=1e-9)
    snippet = median_heuristic_sigmas([x], include_diagonal=False)[0]
    assert math.isclose(snippet, oracle.nonzero_median_sigma(x), rel_tol=1e-9)
    assert kornblith * 2 < snippet  # the zero diagonal pulls the median down


def test_sampled_median_is_seeded_and_close() -> None:
    x = related_layers(600, (5,), seed=12)[0]
    exact = median_heuristic_sigmas([x], max_pairs=10**6)[0]
    sampled = median_heuristic_sigmas([x], max_pairs=4000, seed=3)[0]
    assert sampled == median_heuristic_sigmas([x], max_pairs=4000, seed=3)[0]
    assert sampled != median_heuristic_sigmas([x], max_pairs=4000, seed=4)[0]
    assert abs(sampled / exact - 1) < 0.03
    with_diagonal = sample_pairs(50, include_diagonal=True, max_pairs=1000, seed=0)
    without = sample_pairs(50, include_diagonal=False, max_pairs=1000, seed=0)
    assert (with_diagonal.i == with_diagonal.j).any() and not with_diagonal.exact
    assert (without.i != without.j).all() and not without.exact


def test_sigma_forms() -> None:
    layers = related_layers(30, (4, 4), seed=13)
    per_layer = cka_matrix(layers, "rbf", sigma=[2.0, 2.0])
    assert torch.equal(per_layer, cka_matrix(layers, "rbf", sigma=2.0))
    assert torch.equal(per_layer, cka_matrix(layers, "rbf", sigma=torch.tensor([2.0, 2.0])))
    median = resolve_sigmas(layers)
    assert resolve_sigmas(layers, sigma_scale=0.5) == [0.5 * s for s in median]
    assert torch.equal(cka_matrix(layers, "rbf"), cka_matrix(layers, "rbf", sigma=median))


def test_constant_layer_is_nan_with_a_warning() -> None:
    layers = related_layers(20, (4, 4, 4), seed=14)
    layers[1] = torch.full((20, 4), 3.0)
    for kernel, sigma in (("linear", None), ("rbf", 1.0)):
        with pytest.warns(RuntimeWarning, match="layer 1 has constant activations"):
            cka = cka_matrix(layers, kernel, sigma)
        assert torch.isnan(cka[1]).all() and torch.isnan(cka[:, 1]).all()
        assert cka[0, 0] == 1 and not torch.isnan(cka[0, 2])
    with pytest.raises(InputError, match="layer 1: the median squared distance"):
        cka_matrix(layers, "rbf")


def test_zero_unbiased_hsic_is_nan_with_a_warning() -> None:
    """Orthonormal tokens: the off-diagonal kernel is 0, so unbiased HSIC(a, a) is exactly 0."""
    layers = [torch.eye(8), related_layers(8, (3,), seed=15)[0]]
    with pytest.warns(RuntimeWarning, match="layer 0: HSIC"):
        cka = cka_matrix(layers, "linear", unbiased=True)
    assert torch.isnan(cka[0]).all() and cka[1, 1] == 1


def test_mean_far_above_spread_costs_no_precision() -> None:
    """Layers are centred before any product, so a mean 1e3 or 1e5 times the spread changes nothing
    (float64 input: centred in float64) and raises no precision warning."""
    generator = torch.Generator().manual_seed(16)
    noise = [torch.randn(200, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
    noise[1] += 0.5 * noise[0]
    for kernel, sigma in (("linear", None), ("rbf", 4.0)):
        plain = cka_matrix(noise, kernel, sigma)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for offset in (1e3, 1e5):
                assert torch.allclose(cka_matrix([x + offset for x in noise], kernel, sigma), plain, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: cka_matrix([x[0], x[1][:9]]), "layer 1 holds 9 tokens but layer 0 holds 10"),
        (lambda x: cka_matrix([x[0], x[1].index_fill(0, torch.tensor([4]), math.nan)]), "layer 1 holds NaN or Inf"),
        (lambda x: cka_matrix([x[0].index_fill(0, torch.tensor([2]), math.inf)]), r"layer 0 .* token 2"),
        (lambda x: cka_matrix([y[:3] for y in x], unbiased=True), "needs at least 4"),
        (lambda x: cka_matrix([y[:1] for y in x]), "needs at least 2"),
        (lambda x: cka_matrix(x[0]), r"\[L, n, d\] tensor"),
        (lambda x: cka_matrix([x[0], x[1].long()]), "layer 1 has dtype torch.int64"),
        (lambda x: cka_matrix(x, kernel="poly"), "kernel must be one of"),
        (lambda x: cka_matrix(x, pairs=[(0, 2)]), r"pairs\[0\] = \(0, 2\) names a layer outside"),
        (lambda x: cka_matrix(x, pairs=[]), "pairs is empty"),
        (lambda x: cka_matrix(x, "linear", sigma=1.0), "apply to kernel='rbf' only"),
        (lambda x: cka_matrix(x, "rbf", sigma=[1.0]), "sigma holds 1 values for 2 layers"),
        (lambda x: cka_matrix(x, "rbf", sigma=[1.0, -2.0]), r"sigma\[1\] = -2.0"),
        (lambda x: cka_matrix(x, "rbf", sigma=1.0, sigma_scale=2.0), "leave it at 1.0"),
        (lambda x: cka_matrix(x, "rbf", sigma_scale=0.0), "sigma_scale must be"),
        (lambda x: cka_matrix(x, backend="nope"), "unknown backend"),
        (lambda x: cka_matrix(x, block_size=0), "block_size must be"),
    ],
)
def test_bad_input_raises_a_named_error(call, message: str) -> None:
    layers = related_layers(10, (3, 4), seed=17)
    with pytest.raises(InputError, match=message):
        call(layers)
