"""The tiled torch backend against the plain-torch oracle of the kernel-sums contract."""

from __future__ import annotations

import pytest
import torch
from cka_oracle import centered, gram_linear
from kernel_sums_oracle import oracle_kernel_sums, oracle_magnitudes

from slm_fast.errors import InputError
from slm_fast.kernels import KernelSums, load_backend, tiled
from slm_fast.similarity.estimators import pair_hsic, stats_from_row_sums

WIDTHS = (5, 9, 3)
PAIRS = torch.tensor([[0, 1], [1, 1], [2, 0], [2, 2], [0, 0]])
GAMMAS = [0.08, 0.03, 0.2]


def layers(n: int, dtype: torch.dtype, seed: int, offset: float = 2.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    out = []
    for width in WIDTHS:
        mix = torch.randn(4, width, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, width, generator=generator, dtype=torch.float64)
        out.append((base @ mix + 0.5 * noise + offset).to(dtype))
    return out


def assert_close(ours: KernelSums, rows, cols, kernel, gammas, pairs, rtol: float) -> None:
    """Every sum within rtol of the magnitude of its terms (the sum over |K|): floating-point sums and
    dot products err in proportion to that, not to the (possibly cancelling) value."""
    oracle = oracle_kernel_sums(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    scale = oracle_magnitudes(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    for name in ("frob", "row_sums", "col_sums"):
        got, want, magnitude = getattr(ours, name), getattr(oracle, name), getattr(scale, name)
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        error = (got - want).abs()
        assert bool((error <= rtol * magnitude).all()), (name, float((error / magnitude).max()))


# Products of d <= 9 centred values in float32 err by at most d * 2^-24 of |x~||y~|, exp2 by a few
# ulps, and the float32 partial sums over a tile by (tile length) * 2^-24 at worst: 2e-6 covers all.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_token_form_matches_oracle(kernel: str, symmetric: bool, dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(tiled, "_feature_form_is_cheaper", lambda problem: False)
    rows = layers(37, dtype, seed=1)  # 37 tokens: no multiple of the 8-token tile
    cols = None if symmetric else layers(21, dtype, seed=2)
    gammas = GAMMAS if kernel == "rbf" else None
    ours = tiled.kernel_sums(rows, cols, kernel=kernel, gammas=gammas, pairs=PAIRS, block_size=8)
    assert_close(ours, rows, cols, kernel, gammas, PAIRS, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_feature_form_matches_oracle(symmetric: bool, dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(tiled, "_feature_form_is_cheaper", lambda problem: True)
    monkeypatch.setattr(tiled, "CHUNK_TOKENS", 16)  # several token chunks
    monkeypatch.setattr(tiled, "PANEL_BYTES", {"cpu": 8 * 9 * 9 * 2})  # several batches of pairs
    rows = layers(53, dtype, seed=3)
    cols = None if symmetric else layers(30, dtype, seed=4)
    ours = tiled.kernel_sums(rows, cols, kernel="linear", gammas=None, pairs=PAIRS)
    assert_close(ours, rows, cols, "linear", None, PAIRS, TOLERANCE[dtype])


def test_feature_form_is_chosen_for_many_tokens_and_narrow_layers() -> None:
    narrow = tiled._check([torch.zeros(5000, 8)] * 2, None, "linear", None, PAIRS[:1].clamp_max(1), None)
    wide = tiled._check([torch.zeros(100, 512)] * 2, None, "linear", None, PAIRS[:1].clamp_max(1), None)
    assert tiled._feature_form_is_cheaper(narrow)
    assert not tiled._feature_form_is_cheaper(wide)


def test_default_tile_and_single_token() -> None:
    rows = layers(300, torch.float32, seed=5)
    for kernel, gammas in (("linear", None), ("rbf", GAMMAS)):
        ours = tiled.kernel_sums(rows, None, kernel=kernel, gammas=gammas, pairs=PAIRS)
        assert_close(ours, rows, None, kernel, gammas, PAIRS, 2e-6)
        one = [x[:1] for x in rows]
        ours = tiled.kernel_sums(one, None, kernel=kernel, gammas=gammas, pairs=PAIRS)
        assert_close(ours, one, None, kernel, gammas, PAIRS, 2e-6)


def test_no_columns_gives_zeros() -> None:
    rows = layers(6, torch.float32, seed=6)
    sums = tiled.kernel_sums(rows, [x[:0] for x in rows], kernel="rbf", gammas=GAMMAS, pairs=PAIRS)
    assert sums.frob.shape == (5,) and sums.col_sums.shape == (3, 0)
    assert not sums.frob.any() and not sums.row_sums.any()


def test_rbf_diagonal_is_exactly_one() -> None:
    """Far-apart tokens with large norms: off-diagonal kernel values underflow to 0 and the float32 GEMM
    distance of a token to itself is off by ~|x|^2 eps, yet K must be exactly the identity."""
    x = [torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) * 1e3]
    sums = tiled.kernel_sums(x, None, kernel="rbf", gammas=[1.0], pairs=torch.tensor([[0, 0]]), block_size=16)
    assert sums.frob.tolist() == [40.0] and (sums.row_sums == 1).all()


def test_linear_sums_survive_large_activation_means() -> None:
    """Data whose mean is 30x its spread give HSIC to 1e-6 in both forms: the backend centres before
    any float32 product."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(400, 16, generator=generator) + 30.0
    y = (x - 30.0) @ torch.randn(16, 16, generator=generator) + 0.3 * torch.randn(400, 16, generator=generator)
    y = y - 30.0
    pairs = torch.tensor([[0, 0], [0, 1], [1, 1]])
    for form in (True, False):
        tiled_sums = _with_form(form, [x, y], pairs)
        stats = stats_from_row_sums(400, pairs, tiled_sums.frob, tiled_sums.row_sums, None)
        ours, _ = pair_hsic(stats, unbiased=False)
        grams = [centered(gram_linear(v)) for v in (x, y)]
        want = torch.stack([(grams[a] * grams[b]).sum() / 399**2 for a, b in pairs.tolist()])
        assert torch.allclose(ours, want, rtol=1e-6, atol=0), (form, ours, want)


def _with_form(feature: bool, rows: list[torch.Tensor], pairs: torch.Tensor) -> KernelSums:
    original = tiled._feature_form_is_cheaper
    tiled._feature_form_is_cheaper = lambda problem: feature  # type: ignore[assignment]
    try:
        return tiled.kernel_sums(rows, None, kernel="linear", gammas=None, pairs=pairs, block_size=64)
    finally:
        tiled._feature_form_is_cheaper = original  # type: ignore[assignment]


def test_flat_rbf_kernel_warns_in_float32() -> None:
    x = [torch.randn(20, 4)]
    with pytest.warns(RuntimeWarning, match="mean kernel value"):
        tiled.kernel_sums(x, None, kernel="rbf", gammas=[1e-6], pairs=torch.tensor([[0, 0]]))


def test_tile_and_panel_follow_the_budgets() -> None:
    cpu = torch.device("cpu")
    assert tiled.choose_block_size(1, cpu) == tiled.MAX_TILE["cpu"]
    for layers_count, width in ((8, 576), (32, 4096), (80, 8192)):
        tile = tiled.choose_block_size(layers_count, cpu)
        assert tile % tiled.TILE_ALIGN == 0
        assert 4 * layers_count * tile**2 <= tiled.STAGE_BYTES["cpu"] or tile == tiled.TILE_ALIGN
        panel = tiled.panel_tokens([width] * layers_count, tile, cpu)
        assert panel % tile == 0
        assert 4 * panel * layers_count * (width + 2) <= tiled.PANEL_BYTES["cpu"] or panel == tile


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_one_width_takes_the_batched_gemm(kernel: str, symmetric: bool, monkeypatch) -> None:
    """Layers of one width: the operands are one [L, t, d] tensor and every chunk one batched GEMM."""
    monkeypatch.setattr(tiled, "_feature_form_is_cheaper", lambda problem: False)
    generator = torch.Generator().manual_seed(11)
    rows = [torch.randn(45, 7, generator=generator) + 3.0 for _ in range(3)]
    cols = None if symmetric else [torch.randn(20, 7, generator=generator) - 1.0 for _ in range(3)]
    gammas = GAMMAS if kernel == "rbf" else None
    ours = tiled.kernel_sums(rows, cols, kernel=kernel, gammas=gammas, pairs=PAIRS, block_size=8)
    assert_close(ours, rows, cols, kernel, gammas, PAIRS, TOLERANCE[torch.float32])


def test_several_panels_match_one(monkeypatch) -> None:
    """Panels smaller than the token count: row slabs pair with every later panel, the diagonal block
    of each slab falls inside its own panel."""
    rows = layers(70, torch.float32, seed=9)
    cols = layers(45, torch.float32, seed=10)
    monkeypatch.setattr(tiled, "PANEL_BYTES", {"cpu": 16 * 4 * (sum(WIDTHS) + 6)})  # 16-token panels
    for side in (None, cols):
        ours = tiled.kernel_sums(rows, side, kernel="rbf", gammas=GAMMAS, pairs=PAIRS, block_size=8)
        assert_close(ours, rows, side, "rbf", GAMMAS, PAIRS, 2e-6)


def test_availability_and_loading() -> None:
    assert tiled.unavailable_reason("cpu") is None
    assert "cpu and cuda" in (tiled.unavailable_reason("meta") or "")
    assert load_backend("auto", "cpu") is tiled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel": "cosine"}, "unknown kernel"),
        ({"gammas": [1.0]}, r"needs one gamma per layer \(3\)"),
        ({"gammas": [1.0, -1.0, 1.0]}, "positive and finite"),
        ({"pairs": torch.tensor([[0, 3]])}, r"pairs must index layers 0\.\.2"),
    ],
)
def test_bad_calls_raise_input_error(kwargs: dict, message: str) -> None:
    call = {"kernel": "rbf", "gammas": GAMMAS, "pairs": PAIRS, **kwargs}
    with pytest.raises(InputError, match=message):
        tiled.kernel_sums(layers(5, torch.float32, seed=0), None, **call)


def test_mismatched_layer_shapes_raise() -> None:
    rows = layers(5, torch.float32, seed=0)
    with pytest.raises(InputError, match=r"cols\[0\] has shape"):
        tiled.kernel_sums(rows, [x[:, :2] for x in rows], kernel="linear", gammas=None, pairs=PAIRS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cuda_matches_oracle(kernel: str) -> None:
    rows = layers(700, torch.float32, seed=8)
    gammas = GAMMAS if kernel == "rbf" else None
    ours = tiled.kernel_sums([x.cuda() for x in rows], None, kernel=kernel, gammas=gammas, pairs=PAIRS, block_size=256)
    assert_close(KernelSums(*(t.cpu() for t in ours)), rows, None, kernel, gammas, PAIRS, 2e-6)
