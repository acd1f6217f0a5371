"""The CUDA C++ backend (slm_fast/kernels/cuda.py over the extension built from csrc/) against the
plain-torch oracle, feature-space identities at large n, and the other backends. Needs a CUDA device
and the built extension: `pip install --no-build-isolation -e .` on a machine with CUDA torch and nvcc,
then `python -m pytest -m gpu tests/test_cuda_backend.py`."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_sums_oracle import oracle_kernel_sums

from slm_fast.errors import InputError
from slm_fast.kernels import cuda as cuda_backend

pytestmark = pytest.mark.gpu

_REASON = cuda_backend.unavailable_reason("cuda")
if _REASON is not None:
    pytest.skip(f"the CUDA backend cannot run here: {_REASON}", allow_module_level=True)


def _uncentred(function):
    """The variant with zero centres: these tests check the extension's arithmetic on the given values
    (zero-mean data, so nothing is lost) and the oracle sees exactly what the tensor cores multiply;
    test_gpu_kernels.py and test_similarity_offsets.py check the centring."""

    def call(rows, cols, **kwargs):
        kwargs.setdefault("centers", [torch.zeros(x.shape[1], device=x.device) for x in rows])
        return function(rows, cols, **kwargs)

    return call


VARIANTS = {
    "band": _uncentred(cuda_backend.band_kernel_sums),
    "all_pairs": _uncentred(cuda_backend.all_pairs_kernel_sums),
    "slabs": _uncentred(cuda_backend.slab_kernel_sums),
    "auto": _uncentred(cuda_backend.kernel_sums),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _layers(n_tokens: int, widths: list[int], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_tokens, d, generator=generator).to("cuda", dtype) for d in widths]


def _gammas(widths: list[int]) -> list[float]:
    return [1.0 / (2.0 * d) for d in widths]


def _assert_close(got, want, rtol):
    for name, g, w in zip(("frob", "row_sums", "col_sums"), got, want, strict=True):
        assert g.dtype == torch.float64 and g.device.type == "cuda", name
        assert g.shape == w.shape, name
        scale = w.abs().max().item() if w.numel() else 1.0
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


def _oracle(rows, cols, kernel, gammas, pairs):
    cols = None if cols is None else [c.cpu() for c in cols]
    zeros = [torch.zeros(r.shape[1]) for r in rows]
    return oracle_kernel_sums([r.cpu() for r in rows], cols, kernel=kernel, gammas=gammas, pairs=pairs, centers=zeros)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
@pytest.mark.parametrize("widths", [[64, 40, 128], [33, 20, 72]], ids=["vector-loads", "element-loads"])
def test_matches_oracle(variant, dtype, kernel, symmetric, widths):
    """Ragged token counts over several 64-token tiles; widths that allow 16-byte loads and ones that
    do not; self pairs, cross pairs in both orders, a repeated pair."""
    rows = _layers(150, widths, dtype, seed=1)
    cols = None if symmetric else _layers(70, widths, dtype, seed=2)
    gammas = _gammas(widths) if kernel == "rbf" else None
    pairs = torch.tensor([[0, 1], [1, 2], [0, 0], [2, 1], [2, 2], [0, 1]])
    got = VARIANTS[variant](rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    _assert_close(got, _oracle(rows, cols, kernel, gammas, pairs), rtol=2e-5)


@pytest.mark.parametrize(("m", "k"), [(5, 3), (5, None), (64, None), (1, None)])
def test_small_sizes(m, k):
    rows = _layers(m, [24], torch.float16, seed=3)
    cols = None if k is None else _layers(k, [24], torch.float16, seed=4)
    pairs = torch.tensor([[0, 0]])
    got = VARIANTS["auto"](rows, cols, kernel="rbf", gammas=[0.02], pairs=pairs)
    _assert_close(got, _oracle(rows, cols, "rbf", [0.02], pairs), rtol=2e-5)


def test_tf32_inputs():
    """fp32 inputs on tf32 tensor cores when torch's matmul setting says so: tf32's 10-bit mantissa."""
    rows = _layers(130, [64, 64], torch.float32, seed=5)
    pairs = torch.tensor([[0, 1]])
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        got = VARIANTS["auto"](rows, None, kernel="rbf", gammas=_gammas([64, 64]), pairs=pairs)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    _assert_close(got, _oracle(rows, None, "rbf", _gammas([64, 64]), pairs), rtol=1e-2)


@pytest.mark.parametrize("variant", ["band", "all_pairs"])
def test_large_n_linear_against_feature_space(variant):
    """60k tokens: several row chunks of partial sums and batches of staged tiles. For the linear
    kernel sum(K_a K_b) = |X_a^T X_b|_F^2 and K_a 1 = X_a (X_a^T 1), exact in float64 in O(n d^2)."""
    rows = _layers(60_000, [16, 24], torch.float32, seed=6)
    pairs = torch.tensor([[0, 1], [0, 0], [1, 1]])
    got = VARIANTS[variant](rows, None, kernel="linear", gammas=None, pairs=pairs)
    x = [r.double() for r in rows]
    frob = torch.stack([(x[a].T @ x[b]).square().sum() for a, b in pairs.tolist()])
    row_sums = torch.stack([xa @ xa.sum(0) for xa in x])
    _assert_close(got, (frob, row_sums, row_sums), rtol=1e-6)


def test_symmetric_rbf_diagonal_is_exact():
    x = 100 + torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    got = cuda_backend.kernel_sums([x.cuda()], None, kernel="rbf", gammas=[10.0], pairs=torch.tensor([[0, 0]]))
    assert got.frob.item() == 16.0
    assert got.row_sums.tolist() == [[1.0] * 16]


@pytest.mark.parametrize("other", ["tiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_agrees_with_other_backends(other, dtype):
    try:
        module = importlib.import_module(f"slm_fast.kernels.{'triton_cka' if other == 'triton' else other}")
    except ImportError:
        pytest.skip(f"the {other} backend is not importable")
    if module.unavailable_reason("cuda") is not None:
        pytest.skip(f"the {other} backend cannot run here")
    widths = [256, 128, 256]
    rows = _layers(1000, widths, dtype, seed=7)
    cols = _layers(700, widths, dtype, seed=8)
    pairs = torch.tensor([[a, b] for a in range(3) for b in range(a, 3)])
    for kernel, gammas in [("linear", None), ("rbf", _gammas(widths))]:
        for c in (None, cols):
            zeros = [torch.zeros(w, device="cuda") for w in widths]
            ours = cuda_backend.kernel_sums(rows, c, kernel=kernel, gammas=gammas, pairs=pairs, centers=zeros)
            theirs = module.kernel_sums(rows, c, kernel=kernel, gammas=gammas, pairs=pairs, centers=zeros)
            _assert_close(ours, theirs, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernel": "laplace"}, "unknown kernel"),
        ({"gammas": None}, "one gamma per layer"),
        ({"kernel": "linear"}, "takes no gammas"),
        ({"pairs": torch.tensor([[0, 2]])}, "index layers"),
        ({"block_size": 128}, "fixed at 64"),
        ({"cols": [torch.zeros(3, 16), torch.zeros(3, 9)]}, r"cols\[1\] has shape \(3, 9\); expected \[3, 8\]"),
    ],
)
def test_input_errors(change, message):
    args = {"cols": None, "kernel": "rbf", "gammas": [1.0, 1.0], "pairs": torch.tensor([[0, 1]])} | change
    cols = args.pop("cols")
    cols = None if cols is None else [c.cuda() for c in cols]
    with pytest.raises(InputError, match=message):
        cuda_backend.kernel_sums([torch.zeros(4, 16).cuda(), torch.zeros(4, 8).cuda()], cols, **args)
