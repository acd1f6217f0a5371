"""Every GPU backend (Triton, the CUDA extension, tiled on CUDA) at real sizes, through its default,
autotuned launchers: n = 300-700 tokens over several 128-token tiles (ragged last tiles, off-diagonal
tiles, the pipelined d loop), widths 264, 1001 (padded to 1008) and 4096, bf16 / fp16 / fp32,
symmetric and rectangular, against the float64 oracle on the same rounded values. The all-pairs
paths (Triton's persistent fused kernel, Triton's cuBLAS GEMM slabs with its Triton epilogue, the CUDA
extension's cuBLASLt slabs with its CUDA epilogue) are also each run at every width, whichever
SLAB_MIN_WIDTH would pick. Needs a CUDA device
(`pytest -m gpu tests/test_gpu_kernels.py`); the CUDA cases also need the built extension.

Tolerances, from the arithmetic (u = 2^-24; independent roundings add like a random walk, Higham &
Mary's probabilistic bound). Kernel sums: an entry is a d-long float32 dot product of exactly
representable products (bf16/fp16 products are exact in fp32), so it errs by ~sqrt(d) u of |x||y|
(the RBF exponent likewise, scaled by gamma); a tile's float32 partial sums over B x B entries by ~B u.
`_sums_rtol` allows 8x that, relative to the magnitude of the terms (oracle_magnitudes); the slab
paths' Frobenius products of 16-bit inputs go through a bf16 hi / lo split, <= 3 * 2^-16 of the
magnitude more (SPLIT_ERROR, tests/test_slabs.py). CKA: the float32
target 1e-5 and the bf16 target 1e-3, derived in test_similarity_offsets.py.
"""

from __future__ import annotations

import math

import cka_oracle as oracle
import pytest
import torch
from kernel_sums_oracle import oracle_kernel_sums, oracle_magnitudes
from test_similarity_offsets import BF16_TOLERANCE, FP32_TOLERANCE

from slm_fast import cka_matrix
from slm_fast.errors import InputError
from slm_fast.kernels import KernelSums, centred_copy, layer_centers, load_backend
from slm_fast.similarity import resolve_sigmas

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

BACKENDS = ["tiled", "triton", "cuda"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WIDTHS = [264, 1001, 4096]
TILE = 128  # the largest token tile of the GPU kernels, for the partial-sum term of the tolerance


def _backend(name: str):
    try:
        return load_backend(name, "cuda")
    except InputError as exc:  # e.g. the CUDA extension is not built
        pytest.skip(f"backend {name!r} cannot run: {exc}")


def _activations(n: int, width: int, layers: int, seed: int) -> list[torch.Tensor]:
    """Related layers with an offset of 30, three channels 100x the rest and a repeated first token
    every 50 tokens, in float32 on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=generator)
    out = []
    for _ in range(layers):
        x = torch.tanh(latent @ torch.randn(8, width, generator=generator)) + 0.5 * torch.randn(
            n, width, generator=generator
        )
        x[:, :3] *= 100.0
        x += 30.0
        x[::50] = x[0]
        out.append(x.cuda())
    return out


SPLIT_ERROR = 3 * 2.0**-16


def _sums_rtol(width: int) -> float:
    return 8 * 2.0**-24 * (math.sqrt(width + 2) + TILE)


def _slab_path(module, width: int, pairs: list) -> bool:
    """Whether module.kernel_sums takes a slab path here: Triton or CUDA (the backends with a
    SLAB_MIN_WIDTH), all pairs (the six-pair set; the three-pair set is a band), the width from
    SLAB_MIN_WIDTH on."""
    threshold = getattr(module, "SLAB_MIN_WIDTH", None)
    return threshold is not None and len(pairs) > 3 and width >= threshold


def _check_sums(run, dtype: torch.dtype, width: int, kernel: str, m: int, k, pairs: list, slab: bool) -> None:
    """run(rows, cols, kernel=, gammas=, pairs=, centers=) against the oracle on the same rounded values;
    `slab`: run takes a slab path (its 16-bit Frobenius products are split)."""
    raw = _activations(m + (k or 0), width, 3, seed=width)
    centers = layer_centers(raw)
    # The values the tensor cores multiply: centred in float32, rounded to dtype. Passing them with
    # zero centres makes the backend multiply exactly these; the oracle sees the same values.
    rounded = [centred_copy(x, c, dtype) for x, c in zip(raw, centers, strict=True)]
    rows = [x[:m] for x in rounded]
    cols = None if k is None else [x[m:] for x in rounded]
    zeros = [torch.zeros(width, device="cuda") for _ in rounded]
    gammas = [1.0 / (2.0 * float(x.float().var(0).sum())) for x in rows] if kernel == "rbf" else None
    pairs = torch.tensor(pairs)
    got = run(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs, centers=zeros)
    got = KernelSums(*(t.cpu() for t in got))
    host_rows = [x.cpu() for x in rows]
    host_cols = None if cols is None else [x.cpu() for x in cols]
    host_zeros = [z.cpu() for z in zeros]
    want = oracle_kernel_sums(host_rows, host_cols, kernel=kernel, gammas=gammas, pairs=pairs, centers=host_zeros)
    scale = oracle_magnitudes(host_rows, host_cols, kernel=kernel, gammas=gammas, pairs=pairs, centers=host_zeros)
    for name in ("frob", "row_sums", "col_sums"):
        error = (getattr(got, name) - getattr(want, name)).abs()
        split = slab and dtype != torch.float32 and name == "frob"
        bound = (_sums_rtol(width) + (SPLIT_ERROR if split else 0.0)) * getattr(scale, name)
        assert bool((error <= bound).all()), (name, float((error / getattr(scale, name)).max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize(("m", "k"), [(700, None), (517, 301)], ids=["symmetric", "rectangular"])
@pytest.mark.parametrize(
    "pairs",
    [[[0, 1], [1, 2], [0, 0], [2, 1], [2, 2], [1, 1]], [[0, 1], [0, 0], [1, 1]]],
    ids=["all-pairs-variant", "band-variant"],
)
def test_kernel_sums_at_real_sizes(
    backend: str, dtype: torch.dtype, width: int, kernel: str, m: int, k, pairs: list
) -> None:
    module = _backend(backend)
    _check_sums(module.kernel_sums, dtype, width, kernel, m, k, pairs, _slab_path(module, width, pairs))


@pytest.mark.parametrize(
    ("backend", "path"),
    [("triton", "persistent"), ("triton", "slab"), ("cuda", "slab")],
    ids=["triton-persistent", "triton-slab", "cuda-slab"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)  # fp16 takes bf16's code path
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize(("m", "k"), [(700, None), (517, 301)], ids=["symmetric", "rectangular"])
def test_all_pairs_paths_at_real_sizes(
    backend: str, path: str, dtype: torch.dtype, width: int, kernel: str, m: int, k
) -> None:
    """Each all-pairs path at every width (Triton's autotuned launcher; the slab paths' cuBLAS /
    cuBLASLt GEMMs with fp32 output and their epilogues)."""
    run = getattr(_backend(backend), f"{path}_kernel_sums")
    _check_sums(run, dtype, width, kernel, m, k, [[0, 1], [1, 2], [0, 0], [2, 1], [2, 2], [1, 1]], path == "slab")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_with_offsets_at_real_sizes(backend: str, dtype: torch.dtype, width: int, kernel: str) -> None:
    """cka_matrix on offset / massive-channel / repeated-token activations against the float64 oracle
    on the same (rounded) input values."""
    _backend(backend)
    layers = [x.to(dtype) for x in _activations(600, width, 3, seed=width + 1)]
    host = [x.double().cpu() for x in layers]
    sigmas = resolve_sigmas(host) if kernel == "rbf" else None
    want = oracle.cka_matrix(host, kernel, sigmas, False)
    got = cka_matrix(layers, kernel, sigma=sigmas, backend=backend)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    assert float((got - want).abs().max()) <= tolerance
