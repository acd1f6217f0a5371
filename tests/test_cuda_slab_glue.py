"""The CUDA backend's slab path (slm_fast/kernels/cuda.py, `_run_slabs`) on the CPU, with the
extension's two slab functions emulated in torch exactly as their CUDA code computes them and lays out
their outputs (csrc/cka_slabs.cu: fp32 GEMM into the stage; the epilogue's partial row sums per warp
of 32 columns [L, slab_warp_columns(n_j), n_i] and column sums per 32-row block
[L, slab_row_blocks(n_i), n_j]). Checks the glue no GPU can check here: stacking and centring, the
norms and diagonal shift handed to the epilogue, the offsets, the band / all-pairs / slab choice by
width, against the float64 oracle. The device code itself: compiled by check_cuda_compiles.sh, its
element math host-tested by test_csrc_host.py, run by the GPU tests.

Tolerance, relative to the magnitude of the terms (oracle_magnitudes: |x~||y~| per linear entry, 1 per
RBF entry): fp32 Gram entries (a d-long dot product, ~sqrt(d) u with u = 2^-24) and kernel values
summed in float64 over fp32 partials of at most 32 entries, Frobenius products over fp32 segments of
8192 entries: ~sqrt(8192) u = 5e-6 at most; 2e-5 covers it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_sums_oracle import oracle_kernel_sums, oracle_magnitudes

from slm_fast.kernels import cuda as cuda_backend

EPILOGUE_THREADS, EPILOGUE_ROWS, WARP = 256, 32, 32


def _gram_slab(x: torch.Tensor, y: torch.Tensor, stage: torch.Tensor, tf32: bool) -> None:
    assert not tf32
    torch.bmm(x.float(), y.float().transpose(1, 2), out=stage)


def _slab_epilogue(stage, norm_i, norm_j, scales, offsets, diagonal_shift, rbf, diagonal, col_sums):
    n_layers, n_i, n_j = stage.shape
    values = stage.clone()
    if rbf:
        dist = (norm_i[:, :n_i, None] + norm_j[:, None, :n_j] - 2.0 * stage).clamp_min(0.0)
        if diagonal:
            rows = torch.arange(n_i)[:, None] + diagonal_shift
            dist = torch.where(rows == torch.arange(n_j)[None, :], 0.0, dist)
        values = torch.exp2(-scales[:, None, None] * dist)
        stage.copy_(values - offsets[:, None, None])
    warp_columns = -(-n_j // EPILOGUE_THREADS) * (EPILOGUE_THREADS // WARP)
    padded = torch.zeros(n_layers, n_i, warp_columns * WARP)
    padded[:, :, :n_j] = values
    row_part = padded.view(n_layers, n_i, warp_columns, WARP).sum(3).transpose(1, 2).contiguous()
    row_blocks = -(-n_i // EPILOGUE_ROWS)
    padded = torch.zeros(n_layers, row_blocks * EPILOGUE_ROWS, n_j)
    padded[:, :n_i] = values
    col_part = padded.view(n_layers, row_blocks, EPILOGUE_ROWS, n_j).sum(2) if col_sums else torch.empty(0)
    return row_part, col_part


@pytest.fixture
def emulated(monkeypatch):
    """cuda.py with the emulated extension, on the CPU, the slab path taken from width 64 on."""
    fake = SimpleNamespace(gram_slab=_gram_slab, slab_epilogue=_slab_epilogue, BLOCK=64)
    monkeypatch.setattr(cuda_backend, "_cuda", fake)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(cuda_backend, "SLAB_MIN_WIDTH", 64)
    monkeypatch.setattr(cuda_backend.slabs, "STAGE_BYTES", 3 * 32 * 96 * 4)  # 32-token slabs, 96-column chunks
    monkeypatch.setattr(cuda_backend.slabs, "MAX_SLAB_GPU", 32)
    return cuda_backend


def _layers(n: int, widths: list[int], offset: float, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [offset + torch.randn(n, d, generator=generator) for d in widths]


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_slab_path_matches_oracle(emulated, kernel, symmetric):
    """Three layers (widths 70, 80, 66: padded to 80) with an offset of 30, 1100 + 300 tokens: row slabs
    of 32 and column chunks of 96 (several each, ragged), all pairs."""
    widths = [70, 80, 66]
    rows = _layers(1100, widths, 30.0, seed=1)
    cols = None if symmetric else _layers(300, widths, 30.0, seed=2)
    gammas = [1.0 / (2.0 * d) for d in widths] if kernel == "rbf" else None
    pairs = torch.tensor([[0, 1], [1, 2], [0, 0], [2, 1], [2, 2]])
    got = emulated.kernel_sums(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    want = oracle_kernel_sums(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    scale = oracle_magnitudes(rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    for name, g, w, s in zip(("frob", "row_sums", "col_sums"), got, want, scale, strict=True):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        assert bool(((g - w).abs() <= 2e-5 * s).all()), (name, float(((g - w).abs() / s).max()))


def test_band_and_narrow_layers_stay_on_the_fused_tiles(emulated, monkeypatch):
    """One cross pair of two layers is the band variant, and all pairs below SLAB_MIN_WIDTH use the
    fused tiles: both reach the extension's kernel_sums, never the slab path."""
    calls = []
    fused = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    monkeypatch.setattr(emulated._cuda, "kernel_sums", lambda *args: calls.append(args[-1]) or fused, raising=False)
    wide, narrow = _layers(40, [80, 80], 0.0, seed=3), _layers(40, [48, 48, 48], 0.0, seed=4)
    emulated.kernel_sums(wide, None, kernel="linear", gammas=None, pairs=torch.tensor([[0, 1]]))
    emulated.kernel_sums(narrow, None, kernel="linear", gammas=None, pairs=torch.tensor([[0, 1], [1, 2]]))
    assert calls == [0, 0]  # the extension's "cheaper" variant, which makes the same choice
    assert emulated._prefers_band(2, [(0, 1)]) and not emulated._prefers_band(3, [(0, 1), (1, 2)])
