"""The Triton backend's steps of the slab path (slm_fast/kernels/slabs.py, used from SLAB_MIN_WIDTH on,
see triton_cka.py): the Gram slabs by torch's batched GEMM and the epilogue as a Triton kernel.

`gram_into`: `torch.bmm(x, y^T, out_dtype=float32)` for bf16/fp16 on CUDA (cuBLAS, fp32 accumulation
and output); fp32 inputs follow torch's matmul precision setting; on the CPU (tests, Triton's
interpreter) bf16/fp16 operands are upcast to fp32 first, which gives the same values (products of
bf16/fp16 numbers are exact in fp32, the sums are fp32 in both).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton_cka.unavailable_reason says why
    triton = tl = None

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


def gram_into(stage: Tensor, x: Tensor, y: Tensor) -> None:
    """stage[a] = x[a] @ y[a]^T in fp32 (see the module docstring)."""
    if x.is_cuda:
        if x.dtype == torch.float32:
            torch.bmm(x, y.transpose(1, 2), out=stage)
        else:
            torch.bmm(x, y.transpose(1, 2), out_dtype=torch.float32, out=stage)
    else:
        torch.bmm(x.float(), y.float().transpose(1, 2), out=stage)


def epilogue(
    stage: Tensor,
    norm_i: Tensor,
    norm_j: Tensor,
    scales: Tensor,
    offsets: Tensor,
    diagonal_shift: int,
    rbf: bool,
    diagonal: bool,
    col_sums: bool,
    *,
    interpreting: bool = False,
) -> tuple[Tensor, Tensor]:
    """The slab epilogue (slabs.py) by _epilogue_kernel: partial row sums [L, tiles_j, n_i] and column
    sums [L, tiles_i, n_j] (unwritten when not col_sums)."""
    n_layers, n_i, n_j = stage.shape
    block_i, block_j = (EPILOGUE_BLOCK_I, EPILOGUE_BLOCK_J)
    if interpreting:
        block_i = block_j = EPILOGUE_BLOCK_INTERPRETER
    grid = (n_layers, -(-n_i // block_i), -(-n_j // block_j))
    row_part = torch.empty(n_layers, grid[2], n_i, device=stage.device)
    col_part = torch.empty(n_layers, grid[1], n_j, device=stage.device)
    _epilogue_kernel[grid](
        stage,
        norm_i,
        norm_j,
        scales,
        offsets,
        row_part,
        col_part,
        n_i,
        n_j,
        norm_i.stride(0),
        norm_j.stride(0),
        diagonal_shift,
        RBF=rbf,
        DIAGONAL=diagonal,
        COL_SUMS=col_sums,
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        num_warps=EPILOGUE_WARPS,
    )
    return row_part, col_part
