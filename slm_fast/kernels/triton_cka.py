"""Triton backend of the kernel-sums contract (slm_fast/kernels/__init__.py).

One program per token tile pair (I, J) of B x B tokens (only J >= I in the symmetric case) computes
the Gram tile X_a[I] X_a[J]^T with `tl.dot` over d in chunks (fp32 accumulation), applies the kernel
in registers (linear, or RBF from precomputed squared row norms), and writes only reductions of the
tile: its B row sums, its B column sums and its Frobenius products. Two ways of covering the pairs:

- band (`band_kernel_sums`): one launch per item (a, b) of the requested cross pairs; the program
  computes both layers' tiles and reduces K_a*K_a, K_a*K_b and K_b*K_b without storing a tile. This
  is the sliding search's case (two layers, one pair). A layer's Gram is recomputed in every item
  holding it, so it pays when the cross pairs are few.
- all pairs (`all_pairs_kernel_sums`), by the width (SLAB_MIN_WIDTH):
  - small d (`persistent_kernel_sums`): one persistent launch (a program per SM) loops over the work
    items (layer, tile pair) of a batch of T tile pairs, each a fused tile as above, and stages the
    fp32 kernel tiles in a workspace [T, L, B*B]; one small matmul per tile pair
    (`_staged_frob_kernel`) then gives the L x L Frobenius products of all layers at once;
  - large d (`slab_kernel_sums`): the Gram slabs of all layers by cuBLAS batched GEMM (bf16/fp16 in,
    fp32 out), a Triton epilogue over them and the Frobenius products as one more GEMM
    (slm_fast/kernels/slabs.py, triton_slabs.py).

Inputs are centred first (the contract's centre subtracted in float32, then cast back to the inputs'
dtype, into one stacked tensor [L, n, D], widths zero-padded to a multiple of 16), so RBF distances
come from centred rows and the precision does not depend on the layers' offsets.

`kernel_sums` picks the variant that computes fewer Gram tiles (band or all pairs). Precision:
per-tile partial sums are fp32 (one tile holds at most B*B terms) and every sum across tiles is taken
in float64 on the host, which keeps the results deterministic (no atomics). fp32 inputs use tf32 or ieee dots as torch's
`torch.backends.cuda.matmul.fp32_precision` says (ieee by default), like torch.matmul would.

On the CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1, set by the tests),
which multiplies bf16 wrongly: there bf16 tiles are upcast to fp32 before `tl.dot`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import (
    KernelSums,
    centred_stack,
    check_inputs,
    contract_entry,
    slabs,
    stacked_squared_norms,
    triton_slabs,
)
from slm_fast.kernels.tiled import LOG2_E

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the Triton wheel exists for Linux only
    triton = tl = None
    _TRITON_IMPORT_ERROR: str | None = str(exc)
else:
    _TRITON_IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widths are padded to a multiple of this many elements (zeros add nothing to dots or norms).
WIDTH_ALIGN = 16
BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_BLOCK_GPU = 128
# The band variant holds two kernel tiles in registers: its tile is capped at 64 tokens, with which
# every configuration compiles without spills (at 128, 2 x 128 x 128 fp32 values need more registers
# than 4 or 8 warps have).
BAND_BLOCK_GPU = 64
# fp32 operands take twice the registers of bf16 ones (and ieee dots multiply on CUDA cores, operands
# in registers): 64-token tiles, with which FP32_CONFIGS compile without spills.
FP32_BLOCK_GPU = 64
DEFAULT_BLOCK_INTERPRETER = 16
# Host-side bounds: partial sums of one row chunk, and the staged tiles of one batch of tile pairs.
PARTIALS_BYTES = 256 << 20
STAGED_TILES_BYTES = 2 << 30
# The band variant is used while it computes at most this many Gram tiles per layer on average.
BAND_MAX_GEMMS_PER_LAYER = 1.25
# Row tiles per group of the launch order: programs running together share X tiles in L2.
L2_GROUP_ROWS = 8
# All pairs, the width (after padding) from which the Gram tiles come from vendor GEMMs with a Triton
# epilogue (triton_slabs.py) instead of the fused persistent kernel. The slab path moves each fp32
# kernel entry through memory about four times (GEMM out, epilogue in and out, Frobenius GEMM in),
# 16 bytes per 2 d Gram flops: at d >= 2048 that is >= 256 flops a byte, about an H100's bf16 ridge
# point, so the GEMM's rate decides; below it the fused kernel, which keeps the tile in registers,
# should win. A first estimate from that arithmetic: re-tune it on a GPU (bench_gpu_kernels.py).
SLAB_MIN_WIDTH = 2048
# Programs of a persistent launch in the interpreter (on a GPU: one per SM).
INTERPRETER_PROGRAMS = 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _gram_tile(
        x_ptr,
        y_ptr,
        stride_x,
        stride_y,
        d,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """X[offs_m] @ Y[offs_n]^T as a [BLOCK, BLOCK] fp32 tile, d in chunks of BLOCK_K."""
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
        y_rows = y_ptr + offs_n.to(tl.int64)[:, None] * stride_y
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            y = tl.load(y_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _kernel_tile(
        x_ptr,
        y_ptr,
        norm_x_ptr,
        norm_y_ptr,
        stride_x,
        stride_y,
        d,
        scale,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        RBF: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """The kernel tile K[i, j] = k(x_i, y_j) in fp32, zero outside the valid rows and columns.

        RBF is exp2(-scale |x - y|^2) with scale = log2(e) gamma, and |x - y|^2 = |x|^2 + |y|^2 - 2 x.y
        clamped at 0; with SYMMETRIC the diagonal (same token on both sides) is exactly 0 instead of a
        rounding residue."""
        gram = _gram_tile(
            x_ptr,
            y_ptr,
            stride_x,
            stride_y,
            d,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            BLOCK,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )
        if RBF:
            norm_x = tl.load(norm_x_ptr + offs_m, mask=mask_m, other=0.0)
            norm_y = tl.load(norm_y_ptr + offs_n, mask=mask_n, other=0.0)
            dist = tl.maximum(norm_x[:, None] + norm_y[None, :] - 2.0 * gram, 0.0)
            if SYMMETRIC:
                dist = tl.where(offs_m[:, None] == offs_n[None, :], 0.0, dist)
            values = tl.math.exp2(-scale * dist)
        else:
            values = gram
        return tl.where(mask_m[:, None] & mask_n[None, :], values, 0.0)

    @triton.jit
    def _store_tile_sums(
        values, row_part_ptr, col_part_ptr, part_offset, tile_i, tile_j, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr
    ):
        """Write the tile's row sums and column sums as partials; a symmetric diagonal tile has no
        mirror, so it writes no column sums."""
        offs = tl.arange(0, BLOCK)
        tl.store(row_part_ptr + part_offset + offs, tl.sum(values, axis=1))
        if SYMMETRIC:
            if tile_i != tile_j:
                tl.store(col_part_ptr + part_offset + offs, tl.sum(values, axis=0))
        else:
            tl.store(col_part_ptr + part_offset + offs, tl.sum(values, axis=0))

    @triton.jit
    def _tile_pairs_kernel(
        tile_i_ptr,
        tile_j_ptr,
        first_tile_i,
        n_rows,
        n_cols,
        xa_ptr,
        ya_ptr,
        norm_xa_ptr,
        norm_ya_ptr,
        stride_xa,
        stride_ya,
        d_a,
        scale_a,
        xb_ptr,
        yb_ptr,
        norm_xb_ptr,
        norm_yb_ptr,
        stride_xb,
        stride_yb,
        d_b,
        scale_b,
        row_part_a_ptr,
        col_part_a_ptr,
        row_part_b_ptr,
        col_part_b_ptr,
        stride_part_i,
        stride_part_j,
        frob_ptr,
        stride_frob_q,
        stride_frob_i,
        RBF: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        TWO_LAYERS: tl.constexpr,
        SUMS_A: tl.constexpr,
        SUMS_B: tl.constexpr,
        FROB: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One tile pair (I, J) of layer a (and b when TWO_LAYERS): partial row/column sums of the
        kernel tiles at part[I - first_tile_i, J], their Frobenius products (aa, ab, bb) at
        frob[q, I - first_tile_i, J] when FROB.
        In the symmetric case off-diagonal tiles stand for their mirror too: the products count
        twice and the column sums are the mirror's row sums (diagonal tiles write none)."""
        pid = tl.program_id(0)
        tile_i = tl.load(tile_i_ptr + pid)
        tile_j = tl.load(tile_j_ptr + pid)
        offs_m = tile_i * BLOCK + tl.arange(0, BLOCK)
        offs_n = tile_j * BLOCK + tl.arange(0, BLOCK)
        mask_m = offs_m < n_rows
        mask_n = offs_n < n_cols
        weight = tl.where(tile_i != tile_j, 2.0, 1.0) if SYMMETRIC else 1.0
        local_i = tile_i - first_tile_i
        part_offset = local_i.to(tl.int64) * stride_part_i + tile_j.to(tl.int64) * stride_part_j
        frob_offset = local_i.to(tl.int64) * stride_frob_i + tile_j

        k_a = _kernel_tile(
            xa_ptr,
            ya_ptr,
            norm_xa_ptr,
            norm_ya_ptr,
            stride_xa,
            stride_ya,
            d_a,
            scale_a,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            RBF,
            SYMMETRIC,
            BLOCK,
            BLOCK_K,
            INPUT_PRECISION,
            UPCAST,
        )
        if SUMS_A:
            _store_tile_sums(k_a, row_part_a_ptr, col_part_a_ptr, part_offset, tile_i, tile_j, SYMMETRIC, BLOCK)
        if FROB:
            tl.store(frob_ptr + frob_offset, weight * tl.sum(k_a * k_a))
        if TWO_LAYERS:
            k_b = _kernel_tile(
                xb_ptr,
                yb_ptr,
                norm_xb_ptr,
                norm_yb_ptr,
                stride_xb,
                stride_yb,
                d_b,
                scale_b,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                RBF,
                SYMMETRIC,
                BLOCK,
                BLOCK_K,
                INPUT_PRECISION,
                UPCAST,
            )
            if SUMS_B:
                _store_tile_sums(k_b, row_part_b_ptr, col_part_b_ptr, part_offset, tile_i, tile_j, SYMMETRIC, BLOCK)
            if FROB:
                tl.store(frob_ptr + stride_frob_q + frob_offset, weight * tl.sum(k_a * k_b))
                tl.store(frob_ptr + 2 * stride_frob_q + frob_offset, weight * tl.sum(k_b * k_b))

    @triton.jit
    def _staged_frob_kernel(
        staged_ptr,
        tile_i_ptr,
        tile_j_ptr,
        out_ptr,
        n_layers,
        TILE_ELEMS: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_E: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """out[t, a, b] = weight_t * sum_e staged[t, a, e] * staged[t, b, e] for one block of layers."""
        t = tl.program_id(0)
        layers_a = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        layers_b = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_a = layers_a < n_layers
        mask_b = layers_b < n_layers
        base = staged_ptr + t.to(tl.int64) * n_layers * TILE_ELEMS
        acc = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for e0 in range(0, TILE_ELEMS, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            tiles_a = tl.load(base + layers_a[:, None] * TILE_ELEMS + offs_e[None, :], mask=mask_a[:, None])
            tiles_b = tl.load(base + layers_b[:, None] * TILE_ELEMS + offs_e[None, :], mask=mask_b[:, None])
            acc = tl.dot(tiles_a, tl.trans(tiles_b), acc, input_precision=INPUT_PRECISION)
        if SYMMETRIC:
            acc *= tl.where(tl.load(tile_i_ptr + t) != tl.load(tile_j_ptr + t), 2.0, 1.0)
        out = out_ptr + t.to(tl.int64) * n_layers * n_layers
        tl.store(out + layers_a[:, None] * n_layers + layers_b[None, :], acc, mask=mask_a[:, None] & mask_b[None, :])

    @triton.jit
    def _persistent_kernel(
        tile_i_ptr,
        tile_j_ptr,
        n_pairs,
        n_layers,
        first_tile_i,
        n_rows,
        n_cols,
        x_ptr,
        y_ptr,
        norm_x_ptr,
        norm_y_ptr,
        scale_ptr,
        stride_x_layer,
        stride_y_layer,
        stride_x,
        stride_y,
        d,
        stride_norm_x,
        stride_norm_y,
        row_part_ptr,
        col_part_ptr,
        stride_part_layer,
        stride_part_i,
        stride_part_j,
        staged_ptr,
        RBF: tl.constexpr,
        SYMMETRIC: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """All layers of a batch of tile pairs in one launch of a fixed number of programs: program p
        takes the work items p, p + P, p + 2P, ... of the n_layers x n_pairs items, layer-major (items
        running together share a layer's X tiles in L2). Each item is one fused tile: the Gram tile
        over d (tl.dot, fp32 accumulation), the kernel values, its partial row and column sums at
        part[a, I - first_tile_i, J], and the kernel tile staged at staged[t, a] for the L x L
        Frobenius products (_staged_frob_kernel). x, y: stacked layers [L, n, d]; norms [L, n]."""
        offs = tl.arange(0, BLOCK)
        for item in range(tl.program_id(0), n_pairs * n_layers, tl.num_programs(0)):
            a = item // n_pairs
            t = item - a * n_pairs
            tile_i = tl.load(tile_i_ptr + t)
            tile_j = tl.load(tile_j_ptr + t)
            offs_m = tile_i * BLOCK + offs
            offs_n = tile_j * BLOCK + offs
            mask_m = offs_m < n_rows
            mask_n = offs_n < n_cols
            layer = a.to(tl.int64)
            values = _kernel_tile(
                x_ptr + layer * stride_x_layer,
                y_ptr + layer * stride_y_layer,
                norm_x_ptr + layer * stride_norm_x,
                norm_y_ptr + layer * stride_norm_y,
                stride_x,
                stride_y,
                d,
                tl.load(scale_ptr + a),
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                RBF,
                SYMMETRIC,
                BLOCK,
                BLOCK_K,
                INPUT_PRECISION,
                UPCAST,
            )
            part_offset = layer * stride_part_layer
            part_offset += (tile_i - first_tile_i).to(tl.int64) * stride_part_i + tile_j.to(tl.int64) * stride_part_j
            _store_tile_sums(values, row_part_ptr, col_part_ptr, part_offset, tile_i, tile_j, SYMMETRIC, BLOCK)
            tile = staged_ptr + (t.to(tl.int64) * n_layers + a) * BLOCK * BLOCK
            tl.store(tile + offs[:, None] * BLOCK + offs[None, :], values)

    # Autotuned configurations, one list per register footprint; every one compiles without register
    # spills for sm_80 and sm_90 (tests/test_triton_cka.py compiles them all ahead of time).
    # One kernel tile of BLOCK_GPU x BLOCK_GPU (all-pairs launches, band items of one layer):
    # (4 warps hold 128 fp32 accumulators a thread and spill on sm_80.)
    ONE_LAYER_CONFIGS = [
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_K": 64}, num_warps=16, num_stages=3),
    ]
    # Two kernel tiles of BAND_BLOCK_GPU x BAND_BLOCK_GPU at once (band items of two layers):
    TWO_LAYER_CONFIGS = [
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    ]
    # fp32 inputs (tf32 tensor cores, or ieee dots on CUDA cores with operands and accumulators all in
    # registers), FP32_BLOCK_GPU, one or two layers:
    FP32_CONFIGS = [
        triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=3),
    ]
    _TUNING_KEY = ["d_a", "d_b", "BLOCK", "RBF", "TWO_LAYERS"]
    _AUTOTUNED = {
        (two_layers, fp32): triton.autotune(configs=configs, key=_TUNING_KEY)(_tile_pairs_kernel)
        for two_layers, fp32, configs in [
            (False, False, ONE_LAYER_CONFIGS),
            (True, False, TWO_LAYER_CONFIGS),
            (False, True, FP32_CONFIGS),
            (True, True, FP32_CONFIGS),
        ]
    }
    _PERSISTENT_AUTOTUNED = {
        fp32: triton.autotune(configs=configs, key=["d", "BLOCK", "RBF"])(_persistent_kernel)
        for fp32, configs in [(False, ONE_LAYER_CONFIGS), (True, FP32_CONFIGS)]
    }


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device`, else why not."""
    if triton is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cpu":
        if _interpreting():
            return None
        return "Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1), which is for tests"
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 tensor-core dots need compute capability 8.0 (Ampere) or newer"
    return None


# ---------------------------------------------------------------------------------------------------
# Inputs


class _Problem(NamedTuple):
    """Validated inputs: the centred layers stacked as rows [L, m, D] and cols [L, k, D] (the same
    tensor when symmetric), their fp32 squared row norms [L, m] / [L, k] (RBF), and per layer the
    exponent scale log2(e) gamma_a (0 for the linear kernel)."""

    rows: Tensor
    cols: Tensor
    row_norms: Tensor | None
    col_norms: Tensor | None
    scales: list[float]
    rbf: bool
    symmetric: bool
    pairs: list[tuple[int, int]]

    @property
    def n_layers(self) -> int:
        return self.rows.shape[0]

    @property
    def n_rows(self) -> int:
        return self.rows.shape[1]

    @property
    def n_cols(self) -> int:
        return self.cols.shape[1]

    @property
    def width(self) -> int:
        return self.rows.shape[2]

    @property
    def device(self) -> torch.device:
        return self.rows.device


def _prepare(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None,
) -> _Problem:
    """Check the inputs and centre them: each layer's tokens minus its centre in float32, then cast to
    the inputs' (promoted) dtype, into one stacked copy [L, n, D] whose width D is the widest layer's
    padded with zeros to a multiple of WIDTH_ALIGN (zeros add nothing to dots or norms; the layers of
    one model share a width), so that every row and stride is 16-element aligned: the divisibility
    Triton specialises on for vectorised, pipelined loads (the fast path), whatever the width."""
    inputs = check_inputs(rows, cols, kernel, gammas, pairs, centers, dtypes=SUPPORTED_DTYPES)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs.rows + inputs.cols))
    width = _padded(max(x.shape[1] for x in inputs.rows))
    stacked_rows = centred_stack(inputs.rows, inputs.centers, dtype, width)
    stacked_cols = stacked_rows if inputs.symmetric else centred_stack(inputs.cols, inputs.centers, dtype, width)
    rbf = kernel == "rbf"
    row_norms = col_norms = None
    if rbf:
        row_norms = stacked_squared_norms(stacked_rows)
        col_norms = row_norms if inputs.symmetric else stacked_squared_norms(stacked_cols)
    scales = [LOG2_E * g for g in inputs.gammas] if rbf else [0.0] * len(inputs.rows)
    return _Problem(stacked_rows, stacked_cols, row_norms, col_norms, scales, rbf, inputs.symmetric, inputs.pairs)


def _padded(width: int) -> int:
    return -(-width // WIDTH_ALIGN) * WIDTH_ALIGN


def _block(block_size: int | None) -> int:
    if block_size is None:
        return DEFAULT_BLOCK_INTERPRETER if _interpreting() else DEFAULT_BLOCK_GPU
    if block_size not in BLOCK_SIZES:
        raise InputError(f"the triton backend's token tile must be one of {BLOCK_SIZES}, got {block_size}")
    return block_size


def _input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot precision for fp32 inputs: tf32 when torch's matmul setting allows it, else ieee."""
    if dtype != torch.float32:
        return None
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting is None:  # torch < 2.9
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32" if setting == "tf32" else "ieee"


def _launch_options(dtype: torch.dtype) -> dict:
    """Constexprs shared by every tile launch; the interpreter gets one small fixed config."""
    options = {"INPUT_PRECISION": _input_precision(dtype), "UPCAST": False}
    if _interpreting():
        options.update(BLOCK_K=16, UPCAST=dtype == torch.bfloat16)
    return options


def _tile_kernel(two_layers: bool, dtype: torch.dtype):
    if _interpreting():
        return _tile_pairs_kernel
    return _AUTOTUNED[(two_layers, dtype == torch.float32)]


# ---------------------------------------------------------------------------------------------------
# Tile pairs and partial sums


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile_pair_table(
    first: int, last: int, n_tiles_j: int, symmetric: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Tile pairs (I, J) for row tiles first <= I < last (J >= I when symmetric), int32, ordered
    by groups of L2_GROUP_ROWS row tiles, then J, then I."""
    tile_i, tile_j = torch.meshgrid(torch.arange(first, last), torch.arange(n_tiles_j), indexing="ij")
    tile_i, tile_j = tile_i.flatten(), tile_j.flatten()
    if symmetric:
        keep = tile_j >= tile_i
        tile_i, tile_j = tile_i[keep], tile_j[keep]
    group = (tile_i - first) // L2_GROUP_ROWS
    order = torch.argsort((group * n_tiles_j + tile_j) * L2_GROUP_ROWS + (tile_i - first) % L2_GROUP_ROWS)
    return tile_i[order].to(device, torch.int32), tile_j[order].to(device, torch.int32)


class _Partials(NamedTuple):
    """fp32 per-tile partial sums of one row chunk: rows/cols[layer, I - first, J, :B]."""

    rows: Tensor
    cols: Tensor


_ChunkLauncher = Callable[[int, Tensor, Tensor, _Partials], Tensor]


def _reduce_over_tiles(
    problem: _Problem, block: int, bytes_per_row_tile: int, launch_chunk: _ChunkLauncher
) -> tuple[Tensor, Tensor, Tensor]:
    """Run `launch_chunk(first, tile_i, tile_j, partials)` over chunks of row tiles and sum its
    partials in float64. Returns (frob, row_sums [L, m], col_sums [L, k]); frob is the sum over
    chunks of what launch_chunk returns."""
    n_layers, device = problem.n_layers, problem.device
    n_tiles_i, n_tiles_j = _cdiv(problem.n_rows, block), _cdiv(problem.n_cols, block)
    row_acc = torch.zeros(n_layers, n_tiles_i * block, dtype=torch.float64, device=device)
    col_acc = torch.zeros(n_layers, n_tiles_j * block, dtype=torch.float64, device=device)
    frob = None
    per_row_tile = n_layers * n_tiles_j * 2 * block * 4 + bytes_per_row_tile
    chunk = max(1, PARTIALS_BYTES // per_row_tile)
    for first in range(0, n_tiles_i, chunk):
        last = min(n_tiles_i, first + chunk)
        shape = (n_layers, last - first, n_tiles_j, block)
        partials = _Partials(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        tile_i, tile_j = _tile_pair_table(first, last, n_tiles_j, problem.symmetric, device)
        part_frob = launch_chunk(first, tile_i, tile_j, partials)
        frob = part_frob if frob is None else frob + part_frob
        row_acc[:, first * block : last * block] += partials.rows.sum(2, dtype=torch.float64).flatten(1)
        col_acc += partials.cols.sum(1, dtype=torch.float64).flatten(1)
    row_sums, col_sums = row_acc[:, : problem.n_rows], col_acc[:, : problem.n_cols]
    if problem.symmetric:  # two tensors, so that a caller may change one in place
        row_sums = row_sums + col_sums
        col_sums = row_sums.clone()
    return frob, row_sums.contiguous(), col_sums.contiguous()


def _layer_args(problem: _Problem, a: int) -> tuple:
    """The per-layer kernel arguments: x, y, |x|^2, |y|^2, strides, d, exponent scale."""
    x, y = problem.rows[a], problem.cols[a]
    norm_x = problem.row_norms[a] if problem.rbf else x
    norm_y = problem.col_norms[a] if problem.rbf else y
    return x, y, norm_x, norm_y, x.stride(0), y.stride(0), x.shape[1], problem.scales[a]


def _launch_tile_pairs(
    problem: _Problem,
    block: int,
    first: int,
    tile_i: Tensor,
    tile_j: Tensor,
    partials: _Partials,
    a: int,
    b: int | None = None,
    *,
    sums_a: bool,
    sums_b: bool = False,
    frob: Tensor | None = None,
) -> None:
    """One launch of _tile_pairs_kernel over the given tile pairs for layer a (and b)."""
    rows = partials.rows
    frob_out = rows if frob is None else frob
    _tile_kernel(b is not None, problem.rows[0].dtype)[(tile_i.numel(),)](
        tile_i,
        tile_j,
        first,
        problem.n_rows,
        problem.n_cols,
        *_layer_args(problem, a),
        *_layer_args(problem, a if b is None else b),
        partials.rows[a],
        partials.cols[a],
        partials.rows[a if b is None else b],
        partials.cols[a if b is None else b],
        rows.stride(1),
        rows.stride(2),
        frob_out,
        frob_out.stride(0),
        frob_out.stride(1),
        RBF=problem.rbf,
        SYMMETRIC=problem.symmetric,
        TWO_LAYERS=b is not None,
        SUMS_A=sums_a,
        SUMS_B=sums_b,
        FROB=frob is not None,
        BLOCK=block,
        **_launch_options(problem.rows[0].dtype),
    )


def _empty_result(problem: _Problem) -> KernelSums:
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=problem.device)
    return KernelSums(
        zeros(len(problem.pairs)), zeros(problem.n_layers, problem.n_rows), zeros(problem.n_layers, problem.n_cols)
    )


# ---------------------------------------------------------------------------------------------------
# Band variant


class _BandItem(NamedTuple):
    """One launch of the band variant: layer a, optionally layer b, and which of them write sums."""

    a: int
    b: int | None
    sums_a: bool
    sums_b: bool


def _band_items(n_layers: int, pairs: Sequence[tuple[int, int]]) -> list[_BandItem]:
    """Cross pairs as two-layer items, each layer's sums written by its first item; layers in no
    cross pair get a one-layer item (their sums and self product)."""
    done: set[int] = set()
    items = []
    for a, b in sorted({(min(p), max(p)) for p in pairs if p[0] != p[1]}):
        items.append(_BandItem(a, b, a not in done, b not in done))
        done |= {a, b}
    items += [_BandItem(a, None, True, False) for a in range(n_layers) if a not in done]
    return items


def _band_gemms(items: Sequence[_BandItem]) -> int:
    return sum(1 if item.b is None else 2 for item in items)


def _run_band(problem: _Problem, block: int) -> KernelSums:
    block = min(block, BAND_BLOCK_GPU)
    items = _band_items(problem.n_layers, problem.pairs)
    n_tiles_j = _cdiv(problem.n_cols, block)

    def launch_chunk(first: int, tile_i: Tensor, tile_j: Tensor, partials: _Partials) -> Tensor:
        frob = torch.zeros(len(items), 3, partials.rows.shape[1], n_tiles_j, device=problem.device)
        for item, item_frob in zip(items, frob, strict=True):
            _launch_tile_pairs(
                problem,
                block,
                first,
                tile_i,
                tile_j,
                partials,
                item.a,
                item.b,
                sums_a=item.sums_a,
                sums_b=item.sums_b,
                frob=item_frob,
            )
        return frob.sum((2, 3), dtype=torch.float64)

    frob_items, row_sums, col_sums = _reduce_over_tiles(problem, block, len(items) * 3 * n_tiles_j * 4, launch_chunk)
    products: dict[tuple[int, int], Tensor] = {}
    for item, item_products in zip(items, frob_items, strict=True):
        products.setdefault((item.a, item.a), item_products[0])
        if item.b is not None:
            products.setdefault((item.b, item.b), item_products[2])
            products[(item.a, item.b)] = item_products[1]
    frob = [products[(min(a, b), max(a, b))] for a, b in problem.pairs]
    return KernelSums(_stack(frob, problem.device), row_sums, col_sums)


def _stack(values: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------------------------
# All-pairs variant


def _staged_frob_options(n_layers: int) -> dict:
    """BLOCK_L covers the layers in blocks of >= 16 (tl.dot's minimum); tf32x3 keeps fp32 accuracy
    on NVIDIA tensor cores."""
    precise = "tf32x3" if torch.version.hip is None and not _interpreting() else "ieee"
    return {
        "BLOCK_L": min(64, max(16, triton.next_power_of_2(n_layers))),
        "BLOCK_E": 32,  # 64 spills on sm_80 with tf32x3 (three dots of 64 x 64 operands)
        "INPUT_PRECISION": precise,
    }


def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM on a GPU; a few in the interpreter, so that tests
    cover programs taking several items."""
    if _interpreting():
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _persistent_kernel_fn(dtype: torch.dtype):
    if _interpreting():
        return _persistent_kernel
    return _PERSISTENT_AUTOTUNED[dtype == torch.float32]


def _run_persistent(problem: _Problem, block: int) -> KernelSums:
    """Small d: per batch of tile pairs, one persistent launch computes every layer's fused tiles
    (GEMM, kernel, partial sums, staged tile), then _staged_frob_kernel the L x L products per tile."""
    n_layers, device = problem.n_layers, problem.device
    tile_elems = block * block
    batch = max(1, STAGED_TILES_BYTES // (n_layers * tile_elems * 4))
    frob_options = _staged_frob_options(n_layers)
    programs = _persistent_programs(device)
    scales = torch.tensor(problem.scales, dtype=torch.float32, device=device)
    # (the linear kernel reads no norms: any fp32 tensor serves as the pointer)
    norm_x = problem.row_norms if problem.rbf else scales[None]
    norm_y = problem.col_norms if problem.rbf else scales[None]

    def launch_chunk(first: int, tile_i: Tensor, tile_j: Tensor, partials: _Partials) -> Tensor:
        products = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=device)
        for start in range(0, tile_i.numel(), batch):
            batch_i, batch_j = tile_i[start : start + batch], tile_j[start : start + batch]
            staged = torch.empty(batch_i.numel(), n_layers, tile_elems, device=device)
            _persistent_kernel_fn(problem.rows.dtype)[(programs,)](
                batch_i,
                batch_j,
                batch_i.numel(),
                n_layers,
                first,
                problem.n_rows,
                problem.n_cols,
                problem.rows,
                problem.cols,
                norm_x,
                norm_y,
                scales,
                problem.rows.stride(0),
                problem.cols.stride(0),
                problem.rows.stride(1),
                problem.cols.stride(1),
                problem.width,
                norm_x.stride(0) if problem.rbf else 0,
                norm_y.stride(0) if problem.rbf else 0,
                partials.rows,
                partials.cols,
                partials.rows.stride(0),
                partials.rows.stride(1),
                partials.rows.stride(2),
                staged,
                RBF=problem.rbf,
                SYMMETRIC=problem.symmetric,
                BLOCK=block,
                **_launch_options(problem.rows.dtype),
            )
            tile_products = torch.empty(batch_i.numel(), n_layers, n_layers, device=device)
            n_layer_blocks = _cdiv(n_layers, frob_options["BLOCK_L"])
            _staged_frob_kernel[(batch_i.numel(), n_layer_blocks, n_layer_blocks)](
                staged,
                batch_i,
                batch_j,
                tile_products,
                n_layers,
                TILE_ELEMS=tile_elems,
                SYMMETRIC=problem.symmetric,
                **frob_options,
            )
            products += tile_products.sum(0, dtype=torch.float64)
        return products

    products, row_sums, col_sums = _reduce_over_tiles(problem, block, 0, launch_chunk)
    frob = [products[a, b] for a, b in problem.pairs]
    return KernelSums(_stack(frob, device), row_sums, col_sums)


def _run_slabs(problem: _Problem, block: int) -> KernelSums:
    """Large d: vendor GEMMs for the Gram slabs and a Triton epilogue (slabs.py, triton_slabs.py);
    `block` is not used (slabs.slab_size chooses the slab)."""
    del block
    interpreting = _interpreting()
    return slabs.all_pairs_slabs(
        problem.rows,
        problem.cols,
        problem.row_norms,
        problem.col_norms,
        problem.scales if problem.rbf else None,
        problem.pairs,
        problem.symmetric,
        slab=slabs.slab_size(problem.n_layers, problem.n_rows, problem.symmetric, interpreting),
        gram_into=triton_slabs.gram_into,
        epilogue=functools.partial(triton_slabs.epilogue, interpreting=interpreting),
    )


def _run_all_pairs(problem: _Problem, block: int) -> KernelSums:
    """The all-pairs variant for the width: slabs from SLAB_MIN_WIDTH on, else the persistent kernel."""
    if problem.width >= SLAB_MIN_WIDTH:
        return _run_slabs(problem, block)
    return _run_persistent(problem, block)


# ---------------------------------------------------------------------------------------------------
# Entry points (the backend contract and its two variants)


def _run(
    run: Callable[[_Problem, int], KernelSums],
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None,
    block_size: int | None,
) -> KernelSums:
    if rows:
        reason = unavailable_reason(rows[0].device)
        if reason is not None:
            raise InputError(f"backend 'triton' cannot run on {rows[0].device}: {reason}")
    problem = _prepare(rows, cols, kernel, gammas, pairs, centers)
    block = _block(block_size)
    if block_size is None and problem.rows[0].dtype == torch.float32 and not _interpreting():
        block = FP32_BLOCK_GPU
    if problem.n_rows == 0 or problem.n_cols == 0:
        return _empty_result(problem)
    return run(problem, block)


def _run_cheaper(problem: _Problem, block: int) -> KernelSums:
    gemms = _band_gemms(_band_items(problem.n_layers, problem.pairs))
    if gemms <= BAND_MAX_GEMMS_PER_LAYER * problem.n_layers:
        return _run_band(problem, block)
    return _run_all_pairs(problem, block)


kernel_sums = contract_entry(
    "kernel_sums",
    functools.partial(_run, _run_cheaper),
    """The backend contract (slm_fast/kernels/__init__.py), by the variant computing fewer Gram tiles.

    block_size is the token tile B (16, 32, 64 or 128; default 128 on a GPU; the band variant caps
    it at BAND_BLOCK_GPU = 64).""",
)


band_kernel_sums = contract_entry(
    "band_kernel_sums",
    functools.partial(_run, _run_band),
    """kernel_sums by the band variant: one launch per cross pair, both tiles in registers (token tile
    at most BAND_BLOCK_GPU).""",
)


all_pairs_kernel_sums = contract_entry(
    "all_pairs_kernel_sums",
    functools.partial(_run, _run_all_pairs),
    """kernel_sums by the all-pairs variant for the width: the persistent kernel below SLAB_MIN_WIDTH,
    vendor GEMM slabs with a Triton epilogue from it on.""",
)


persistent_kernel_sums = contract_entry(
    "persistent_kernel_sums",
    functools.partial(_run, _run_persistent),
    """kernel_sums by the all-pairs persistent kernel (the choice below SLAB_MIN_WIDTH).""",
)


slab_kernel_sums = contract_entry(
    "slab_kernel_sums",
    functools.partial(_run, _run_slabs),
    """kernel_sums by vendor GEMM slabs and the Triton epilogue (the choice from SLAB_MIN_WIDTH on);
    block_size is checked but the slab size is triton_slabs' choice.""",
)
