"""All-pairs kernel sums by Gram slabs: the GPU form of the CPU tiled backend's structure
(slm_fast/kernels/tiled.py), shared by the Triton and CUDA backends, which supply its two steps.

The layers come centred and stacked: rows [L, m, D], cols [L, k, D] (the same tensor when symmetric).
Per row slab I of t tokens and column chunk J (the diagonal block [I, I] whole first, then only
columns from the slab's end on, in the symmetric case):
1. `gram_into(stage, x, y)`: the Gram tiles of all L layers by one batched GEMM into a stage
   [L, t, c] of fp32 (fp32 accumulation): cuBLAS through torch.bmm(out_dtype=float32) for Triton,
   cuBLASLt for the CUDA extension;
2. `epilogue(stage, norm_i, norm_j, scales, offsets, diagonal_shift, rbf, diagonal, col_sums)`, in
   place over the stage: RBF values exp2(-s_a |x~ - y~|^2) from the Gram entries and the fp32 squared
   norms (s_a = log2(e) gamma_a), the stage overwritten with K - c_a, and fp32 partial row sums
   [L, p, t] and column sums [L, q, c] returned, each over a short run of entries; they are summed
   here in float64;
3. the L x L Frobenius products of the chunk from the stage by one more GEMM over segments of
   FROB_SEGMENT entries (fp32 partial dot products, reduced in float64). Its flops are L / d of the
   Gram's, but in fp32 on CUDA cores they would run ~15x slower than the bf16 Gram (some 14% of the
   time at L = 80, d = 8192); so for bf16/fp16 inputs the stage D is split as hi = bf16(D),
   lo = bf16(D - hi) and D_a.D_b = hi_a.hi_b + hi_a.lo_b + lo_a.hi_b (three bf16 GEMMs with fp32
   output): a relative error ~2^-16 per product, far below the bf16 inputs' own 2^-9; fp32 inputs keep
   the fp32 GEMM (`tiled.stage_gram`).

c_a is the mean kernel value of the first chunk; staging K - c_a keeps the large cancellations of
HSIC centring in float64, where c_a is added back (`_frob_with_offsets`). The linear kernel stages the
Gram tile itself (c_a = 0) and the epilogue only reduces it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums
from slm_fast.kernels.tiled import FROB_SEGMENT, stage_gram

# Bytes of the fp32 stage [L, t, c] of one slab and chunk.
STAGE_BYTES = 2 << 30
# Entries per layer split into bf16 hi / lo at a time (bounds the temporaries: 8 bytes an entry).
SPLIT_ENTRIES = 1 << 20
# Row slab t on a GPU: the symmetric pass computes diagonal blocks whole, t / n of the work extra, so
# the slab is also kept under n / 32 (3%); chunks are multiples of it.
MAX_SLAB_GPU = 1024
MIN_SLAB = 16

GramInto = Callable[[Tensor, Tensor, Tensor], None]
Epilogue = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, bool, bool, bool], tuple[Tensor, Tensor]]


def slab_size(n_layers: int, m: int, symmetric: bool, interpreting: bool) -> int:
    """Row slab t: MIN_SLAB in Triton's interpreter (small tests still cover several slabs); on a GPU
    the largest power of two <= MAX_SLAB_GPU such that the stage of one slab square fits STAGE_BYTES,
    and under m / 32 in the symmetric case (diagonal blocks computed whole)."""
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


def all_pairs_slabs(
    rows: Tensor,
    cols: Tensor,
    row_norms: Tensor | None,
    col_norms: Tensor | None,
    scales: Sequence[float] | None,
    pairs: Sequence[tuple[int, int]],
    symmetric: bool,
    *,
    slab: int,
    gram_into: GramInto,
    epilogue: Epilogue,
) -> KernelSums:
    """Kernel sums of centred, stacked layers rows [L, m, D] and cols [L, k, D]; for RBF their fp32
    squared norms [L, m] / [L, k] and the exponent scales log2(e) gamma_a (None: the linear kernel).
    `slab`: row slab t (see slab_size)."""
    n_layers, m, _ = rows.shape
    k = cols.shape[1]
    device = rows.device
    rbf = scales is not None
    chunk = chunk_size(n_layers, slab)
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
            gram_into(stage, rows[:, i0:i1], cols[:, j0:j1])
            # (the linear kernel reads no norms: any fp32 tensor serves)
            norm_i, norm_j = (row_norms[:, i0:], col_norms[:, j0:]) if rbf else (scale_table[None], scale_table[None])
            row_part, col_part = epilogue(
                stage, norm_i, norm_j, scale_table, offsets, i0 - j0, rbf, on_diagonal, not on_diagonal
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
            frob += weight * (stage_gram(staged) if rows.dtype == torch.float32 else _split_gram(staged))
    col = row.clone() if symmetric else col
    return KernelSums(_frob_with_offsets(frob, involved, pairs, row, offsets.double(), m * k), row, col)


def _split_gram(tiles: Tensor) -> Tensor:
    """[S, ti, tj] fp32 -> [S, S] float64 Gram of the flattened tiles by three bf16 GEMMs of the hi / lo
    split (module docstring), fp32 partial dot products over FROB_SEGMENT entries."""
    slots = tiles.shape[0]
    flat = tiles.reshape(slots, -1)
    gram = torch.zeros(slots, slots, dtype=torch.float64, device=tiles.device)
    for start in range(0, flat.shape[1], SPLIT_ENTRIES):
        part = flat[:, start : start + SPLIT_ENTRIES]
        hi = part.to(torch.bfloat16)
        lo = (part - hi.float()).to(torch.bfloat16)
        length = part.shape[1]
        segments = -(-length // FROB_SEGMENT)
        if segments * FROB_SEGMENT != length:  # zero-pad the last segment (adds nothing)
            hi = torch.nn.functional.pad(hi, (0, segments * FROB_SEGMENT - length))
            lo = torch.nn.functional.pad(lo, (0, segments * FROB_SEGMENT - length))
        hi = hi.view(slots, segments, FROB_SEGMENT).transpose(0, 1)
        lo = lo.view(slots, segments, FROB_SEGMENT).transpose(0, 1)
        products = _bmm_f32(hi, hi.transpose(1, 2)) + _bmm_f32(hi, lo.transpose(1, 2))
        products += _bmm_f32(lo, hi.transpose(1, 2))
        gram += products.double().sum(0)
    return gram


def _bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b of bf16 batches with fp32 accumulation and output: cuBLAS on CUDA; on the CPU through fp32
    operands (the same values: bf16 products are exact in fp32)."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


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
