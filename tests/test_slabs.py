"""Pieces of the slab path (slm_fast/kernels/slabs.py) that the backends' oracle tests reach only as
a whole: the bf16 hi / lo split of the Frobenius GEMM and the slab and chunk plan."""

from __future__ import annotations

import torch

from slm_fast.kernels import slabs


def test_split_gram_keeps_about_16_bits():
    """D = hi + lo + r with hi = bf16(D), lo = bf16(D - hi) (bf16 unit roundoff 2^-8): |lo| <= 2^-8 |D|,
    |r| <= 2^-16 |D|; dropping lo_a lo_b and r leaves <= 3 * 2^-16 of |D_a||D_b| per product, and the
    fp32 partial sums over 8192 entries add ~sqrt(8192) 2^-24 = 5e-6. Bound: 5e-5 of sum |D_a||D_b|;
    a plain bf16 product (2^-7) would miss it by 100x. Ragged: 3 x 70 x 301 entries, two split rounds."""
    generator = torch.Generator().manual_seed(0)
    tiles = torch.rand(3, 70, 301, generator=generator) * 2 - 0.6
    tiles[1] *= 1e3  # scales differ between layers
    old = slabs.SPLIT_ENTRIES
    try:
        slabs.SPLIT_ENTRIES = 12000  # two rounds, the second with a ragged last segment
        got = slabs._split_gram(tiles)
    finally:
        slabs.SPLIT_ENTRIES = old
    flat = tiles.reshape(3, -1).double()
    want = flat @ flat.T
    magnitude = flat.abs() @ flat.abs().T
    assert bool(((got - want).abs() <= 5e-5 * magnitude).all())
    plain = flat.to(torch.bfloat16).double()
    assert bool(((plain @ plain.T - want).abs() > 5e-5 * magnitude).any())


def test_chunks_cover_j_at_least_i_once():
    """Symmetric: the diagonal block, then every column from the slab's end on, each once."""
    seen = torch.zeros(100, 100, dtype=torch.int64)
    for i0 in range(0, 100, 16):
        i1 = min(i0 + 16, 100)
        for j0, j1, on_diagonal in slabs._chunks(i0, i1, 100, 48, symmetric=True):
            assert on_diagonal == (j0 == i0)
            seen[i0:i1, j0:j1] += 1
    rows, cols = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    upper_blocks = cols >= (rows // 16) * 16
    assert bool((seen == upper_blocks.long()).all())
