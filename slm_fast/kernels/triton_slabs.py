"""Large-d all-pairs kernel sums for the Triton backend: vendor GEMMs for the Gram slabs, a Triton
epilogue, and the L x L Frobenius products as one more GEMM (the structure of the CPU tiled backend,
slm_fast/kernels/tiled.py). The caller (triton_cka.py) centres and stacks the layers.

Per row slab I of t tokens and column chunk J of the slab's columns (the diagonal block [I, I] whole
first and only J >= I in the symmetric case):
1. the Gram tiles of all L layers by one batched GEMM into a stage [L, t, c] of fp32:
   `torch.bmm(x, y^T, out_dtype=float32)` for bf16/fp16 on CUDA (cuBLAS, fp32 accumulation and
   output); fp32 inputs follow torch's matmul precision setting; on the CPU (tests, Triton's
   interpreter) bf16/fp16 operands are upcast to fp32 first, which gives the same values (products
   of bf16/fp16 numbers are exact in fp32, the sums are fp32 in both);
2. the Triton epilogue `_epilogue_kernel` in place over the stage: RBF values
   exp2(-s_a |x~ - y~|^2) from the Gram tile and the fp32 squared norms (s_a = log2(e) gamma_a),
   row and column sums of each tile written as fp32 partials (one per tile, summed in float64 on the
   host), and the stage overwritten with K - c_a;
3. the L x L Frobenius products of the chunk from the stage by one fp32 GEMM (`tiled._stage_gram`:
   float32 partial dot products over at most FROB_SEGMENT entries, reduced in float64).

c_a is the mean kernel value of the first chunk; staging K - c_a keeps the large cancellations of
HSIC centring in float64, where c_a is added back (`_frob_with_offsets`). The linear kernel stages the
Gram tile itself (c_a = 0) and the epilogue only reduces it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums
from slm_fast.kernels.tiled import _stage_gram

try:
    import triton
    import triton.language as tl
except ImportError:  # triton_cka.unavailable_reason says why
    triton = tl = None

# Bytes of the fp32 stage [L, t, c] of one slab and chunk.
STAGE_BYTES = 2 << 30
# Row slab t on a GPU: the symmetric pass computes diagonal blocks whole, t / n of the work extra, so
# the slab is also kept under n / 32 (3%); chunks are multiples of it.
MAX_SLAB_GPU = 1024
MIN_SLAB = 16
# Epilogue tile of the Triton kernel (rows x columns of the stage per program).
EPILOGUE_BLOCK_I = 32
EPILOGUE_BLOCK_J = 128
EPILOGUE_BLOCK_INTERPRETER = 16
EPILOGUE_WARPS = 4


if triton is not None:

    @triton.jit
    def _epilogue_kernel(
        stage_ptr,
        row_norm_ptr,
        col_norm_ptr,
        scale_ptr,
        offset_ptr,
        row_part_ptr,
        col_part_ptr,
        n_i,
        n_j,
        stride_row_norm,
        stride_col_norm,
        diagonal_shift,
        RBF: tl.constexpr,
        DIAGONAL: tl.constexpr,
        COL_SUMS: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
    ):
        """One [BLOCK_I, BLOCK_J] tile of layer a's stage [n_i, n_j] (the Gram tile in fp32): its kernel
        values, their row sums at row_part[a, tile_j, :] and column sums at col_part[a, tile_i, :], and
        (RBF) K - offset[a] written back. DIAGONAL: stage column j is the token of stage row
        j - diagonal_shift, so where they meet the distance is exactly 0."""
        a = tl.program_id(0)
        tile_i = tl.program_id(1)
        tile_j = tl.program_id(2)
        offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_i = offs_i < n_i
        mask_j = offs_j < n_j
        mask = mask_i[:, None] & mask_j[None, :]
        base = stage_ptr + a.to(tl.int64) * n_i * n_j
        ptrs = base + offs_i.to(tl.int64)[:, None] * n_j + offs_j[None, :]
        gram = tl.load(ptrs, mask=mask, other=0.0)
        if RBF:
            norm_i = tl.load(row_norm_ptr + a * stride_row_norm + offs_i, mask=mask_i, other=0.0)
            norm_j = tl.load(col_norm_ptr + a * stride_col_norm + offs_j, mask=mask_j, other=0.0)
            scale = tl.load(scale_ptr + a)
            dist = tl.maximum(norm_i[:, None] + norm_j[None, :] - 2.0 * gram, 0.0)
            if DIAGONAL:
                dist = tl.where(offs_i[:, None] + diagonal_shift == offs_j[None, :], 0.0, dist)
            values = tl.where(mask, tl.math.exp2(-scale * dist), 0.0)
            tl.store(ptrs, values - tl.load(offset_ptr + a), mask=mask)
        else:
            values = gram
        n_tiles_j = tl.num_programs(2)
        n_tiles_i = tl.num_programs(1)
        row_out = row_part_ptr + (a.to(tl.int64) * n_tiles_j + tile_j) * n_i
        tl.store(row_out + offs_i, tl.sum(values, axis=1), mask=mask_i)
        if COL_SUMS:
            col_out = col_part_ptr + (a.to(tl.int64) * n_tiles_i + tile_i) * n_j
            tl.store(col_out + offs_j, tl.sum(values, axis=0), mask=mask_j)


def slab_size(n_layers: int, m: int, symmetric: bool, interpreting: bool) -> int:
    """Row slab t: MIN_SLAB in the interpreter (small tests still cover several slabs); on a GPU the
    largest power of two <= MAX_SLAB_GPU such that the stage of one slab square fits STAGE_BYTES, and
    under m / 32 in the symmetric case (diagonal blocks computed whole)."""
    if interpreting:
        return MIN_SLAB
    t = MAX_SLAB_GPU
    while t > MIN_SLAB and (n_layers * t * t * 4 > STAGE_BYTES or (symmetric and t > m // 32)):
        t //= 2
    return t


def chunk_size(n_layers: int, slab: int) -> int:
    """Columns c per chunk: the largest multiple of the slab with the stage [L, t, c] in STAGE_BYTES."""
    return max(slab, STAGE_BYTES // (4 * n_layers * slab) // slab * slab)


def _chunks(i0: int, i1: int, k: int, chunk: int, symmetric: bool) -> Iterator[tuple[int, int, bool]]:
    """(j0, j1, on_diagonal) of the column chunks of row slab [i0, i1): symmetric, the diagonal block
    whole, then columns from i1 on."""
    start = 0
    if symmetric:
        yield i0, i1, True
        start = i1
    for j0 in range(start, k, chunk):
        yield j0, min(j0 + chunk, k), False


def _gram_into(stage: Tensor, x: Tensor, y: Tensor) -> None:
    """stage[a] = x[a] @ y[a]^T in fp32 (see the module docstring)."""
    if x.is_cuda:
        if x.dtype == torch.float32:
            torch.bmm(x, y.transpose(1, 2), out=stage)
        else:
            torch.bmm(x, y.transpose(1, 2), out_dtype=torch.float32, out=stage)
    else:
        torch.bmm(x.float(), y.float().transpose(1, 2), out=stage)


def all_pairs_slabs(
    rows: Tensor,
    cols: Tensor,
    row_norms: Tensor | None,
    col_norms: Tensor | None,
    scales: Sequence[float] | None,
    pairs: Sequence[tuple[int, int]],
    symmetric: bool,
    interpreting: bool,
) -> KernelSums:
    """Kernel sums of centred, stacked layers: rows [L, m, D], cols [L, k, D] (the same tensor when
    symmetric), and for RBF their fp32 squared norms [L, m] / [L, k] and the exponent scales
    log2(e) gamma_a (None for the linear kernel)."""
    n_layers, m, _ = rows.shape
    k = cols.shape[1]
    device = rows.device
    rbf = scales is not None
    slab = slab_size(n_layers, m, symmetric, interpreting)
    chunk = chunk_size(n_layers, slab)
    block_i, block_j = (EPILOGUE_BLOCK_I, EPILOGUE_BLOCK_J)
    if interpreting:
        block_i = block_j = EPILOGUE_BLOCK_INTERPRETER
    involved = sorted({a for pair in pairs for a in pair})
    scale_table = torch.tensor(scales if rbf else [0.0] * n_layers, dtype=torch.float32, device=device)
    offsets = torch.zeros(n_layers, device=device)
    have_offsets = not rbf
    row = torch.zeros(n_layers, m, dtype=torch.float64, device=device)
    col = row if symmetric else torch.zeros(n_layers, k, dtype=torch.float64, device=device)
    frob = torch.zeros(len(involved), len(involved), dtype=torch.float64, device=device)
    storage = torch.empty(n_layers * slab * max(slab, min(chunk, k)), device=device)
    for i0 in range(0, m, slab):
        i1 = min(i0 + slab, m)
        for j0, j1, on_diagonal in _chunks(i0, i1, k, chunk, symmetric):
            n_i, n_j = i1 - i0, j1 - j0
            stage = storage[: n_layers * n_i * n_j].view(n_layers, n_i, n_j)
            _gram_into(stage, rows[:, i0:i1], cols[:, j0:j1])
            grid = (n_layers, -(-n_i // block_i), -(-n_j // block_j))
            row_part = torch.empty(n_layers, grid[2], n_i, device=device)
            col_part = torch.empty(n_layers, grid[1], n_j, device=device)
            # (the linear kernel reads no norms: any fp32 tensor serves as the pointer)
            norm_i, norm_j = (row_norms[:, i0:], col_norms[:, j0:]) if rbf else (scale_table[None], scale_table[None])
            _epilogue_kernel[grid](
                stage,
                norm_i,
                norm_j,
                scale_table,
                offsets,
                row_part,
                col_part,
                n_i,
                n_j,
                norm_i.stride(0),
                norm_j.stride(0),
                i0 - j0,
                RBF=rbf,
                DIAGONAL=on_diagonal,
                COL_SUMS=not on_diagonal,
                BLOCK_I=block_i,
                BLOCK_J=block_j,
                num_warps=EPILOGUE_WARPS,
            )
            if not have_offsets:  # the first RBF chunk: its mean kernel value per layer becomes c_a
                offsets = stage.mean((1, 2))
                stage.sub_(offsets[:, None, None])
                have_offsets = True
            row[:, i0:i1] += row_part.sum(1, dtype=torch.float64)
            if not on_diagonal:
                col[:, j0:j1] += col_part.sum(1, dtype=torch.float64)
            weight = 2.0 if symmetric and not on_diagonal else 1.0
            staged = stage if len(involved) == n_layers else stage[involved]
            frob += weight * _stage_gram(staged)
    col = row.clone() if symmetric else col
    return KernelSums(_frob_with_offsets(frob, involved, pairs, row, offsets.double(), m * k), row, col)


def _frob_with_offsets(
    staged: Tensor, involved: list[int], pairs: Sequence[tuple[int, int]], row: Tensor, c: Tensor, entries: int
) -> Tensor:
    """sum K_a K_b from G = sum D_a D_b of the staged D = K - c (float64):
    sum K_a K_b = G_ab + c_b T_a + c_a T_b - N c_a c_b, with T_a = sum K_a (the row sums' total) and N
    the number of entries."""
    slot = {a: s for s, a in enumerate(involved)}
    totals = row.sum(1)
    values = [staged[slot[a], slot[b]] + c[b] * totals[a] + c[a] * totals[b] - entries * c[a] * c[b] for a, b in pairs]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=row.device)
