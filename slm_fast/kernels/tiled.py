"""Tiled torch backend of the kernel-sums contract (see slm_fast/kernels/__init__.py): CPU and CUDA,
memory O(n) beyond the inputs.

Token form (both kernels). The column tokens are visited in panels; each panel is centred once for
every layer (x~ = x - c_a, float32) into GEMM-ready operands. Then, per row slab I of t tokens:
- the slab's operands are prepared for every layer (centred; for RBF scaled and augmented by two
  columns, so that one GEMM yields the exponent log2(e) * -gamma |x~ - y~|^2 directly);
- for each column chunk J of t tokens (only J >= I in the symmetric case; the diagonal block I = J
  is computed whole), the L kernel tiles are GEMMs written side by side into a layer-major stage
  [L, t, t] that stays in cache, followed by an epilogue over the whole stage: exp2 (RBF), the
  offset c subtracted, row sums and column sums;
- all L x L Frobenius products of the chunk come from one more GEMM of the stage with itself (each
  float32 partial dot product spans FROB_SEGMENT elements, then float64).
The GEMMs are the only O(t^2 d) work; the epilogue is a few passes over a cached stage.

Feature form (linear kernel), used when cheaper (many tokens, small d, few pairs):
sum_ij (x~_ai.y~_aj)(x~_bi.y~_bj) = <X~_a^T X~_b, Y~_a^T Y~_b>_F, streamed over token chunks into
float64 d_a x d_b accumulators.

Numerics. Products are float32 (float64 when an input is float64) and reduced into float64. Centring
in float32 before any product keeps the float32 quantities small whatever the layer's offset. RBF
tiles are moreover staged as K - c, with c the mean kernel value of the first chunk, and c is added
back in float64 (`_add_offsets`), so that the large cancellations of HSIC centring happen in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums, check_inputs

# Largest token tile per device type, and the bytes of the stage of L tiles [L, t, t]. On the CPU the
# stage should stay in the last-level cache (the epilogue makes a few passes over it) while the tiles
# stay large enough for the GEMMs to run at full rate: measured on a 2-core EPYC, t = 384-512 at L = 8
# reaches 0.84x (d = 576) and 0.91x (d = 4096) of the same-shape GEMM rate, t = 256 0.79x and 0.87x.
MAX_TILE = {"cpu": 512, "cuda": 4096}
STAGE_BYTES = {"cpu": 8 * 2**20, "cuda": 2 * 2**30}
# Bytes of the centred operands of one panel of column tokens (all layers).
PANEL_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}
TILE_ALIGN = 32
# Elements per partial dot product of the staged Frobenius GEMM before the float64 reduction.
FROB_SEGMENT = 8192
# Tokens per chunk of the passes that stream over tokens (feature-form products).
CHUNK_TOKENS = 4096
# Cost of the RBF epilogue (exp, offset, row and column sums) per kernel entry, in GEMM-flop units;
# used only to choose between the token and feature forms of the linear kernel.
EPILOGUE_FLOPS = 16
# Mean RBF kernel value above which float32 tiles keep too few digits of the kernel's variation.
FLAT_KERNEL_MEAN = 0.99
LOG2_E = 1.0 / math.log(2.0)


def unavailable_reason(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch was built without CUDA or sees no GPU"
    return f"the tiled backend needs float64 accumulators, which it supports on cpu and cuda only, not {device.type}"


def choose_block_size(num_layers: int, device: torch.device, element_bytes: int = 4) -> int:
    """Token tile t such that the stage of num_layers t x t tiles fits STAGE_BYTES[device], capped at
    MAX_TILE[device] and aligned to TILE_ALIGN."""
    budget = STAGE_BYTES.get(device.type, STAGE_BYTES["cpu"]) // element_bytes
    t = int(math.sqrt(budget / num_layers)) // TILE_ALIGN * TILE_ALIGN
    return max(TILE_ALIGN, min(MAX_TILE.get(device.type, MAX_TILE["cpu"]), t))


def default_tile(num_layers: int, m: int, symmetric: bool, device: torch.device, element_bytes: int = 4) -> int:
    """The token tile kernel_sums uses when block_size is None. In the symmetric case diagonal blocks
    are computed whole: the tile is kept under m / 8, so that this waste stays under 1/8 of the work."""
    tile = choose_block_size(num_layers, device, element_bytes)
    if symmetric:
        tile = max(TILE_ALIGN, min(tile, m // 8 // TILE_ALIGN * TILE_ALIGN))
    return tile


def symmetric_entries(m: int, tile: int) -> int:
    """Kernel entries the symmetric token form computes per layer: for each row slab I, the columns
    j >= start of I (its diagonal block whole). The Gram flops performed are 2 d of them each."""
    return sum((min(i0 + tile, m) - i0) * (m - i0) for i0 in range(0, m, tile))


def panel_tokens(widths: Sequence[int], tile: int, device: torch.device, element_bytes: int = 4) -> int:
    """Column tokens per panel: a multiple of the tile whose centred operands fit PANEL_BYTES[device]."""
    per_token = (sum(widths) + 2 * len(widths)) * element_bytes
    budget = PANEL_BYTES.get(device.type, PANEL_BYTES["cpu"])
    return max(tile, budget // per_token // tile * tile)


@dataclass(frozen=True)
class _Problem:
    rows: Sequence[Tensor]
    cols: Sequence[Tensor]  # `rows` itself in the symmetric case
    symmetric: bool
    kernel: str
    gammas: list[float] | None
    pairs: Tensor  # [P, 2] int64 on the CPU
    centers: list[Tensor]  # [d_a] in the compute dtype
    dtype: torch.dtype  # compute dtype of the tiles
    device: torch.device

    @property
    def num_layers(self) -> int:
        return len(self.rows)

    @property
    def m(self) -> int:
        return self.rows[0].shape[0]

    @property
    def k(self) -> int:
        return self.cols[0].shape[0]

    @property
    def widths(self) -> list[int]:
        return [x.shape[1] for x in self.rows]

    @property
    def rbf(self) -> bool:
        return self.kernel == "rbf"


def kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
    block_size: int | None = None,
) -> KernelSums:
    problem = _check(rows, cols, kernel, gammas, pairs, centers)
    if problem.m == 0 or problem.k == 0:
        zeros = torch.zeros
        return KernelSums(
            frob=zeros(len(problem.pairs), dtype=torch.float64, device=problem.device),
            row_sums=zeros(problem.num_layers, problem.m, dtype=torch.float64, device=problem.device),
            col_sums=zeros(problem.num_layers, problem.k, dtype=torch.float64, device=problem.device),
        )
    if not problem.rbf and _feature_form_is_cheaper(problem):
        return _feature_form(problem)
    element_bytes = torch.finfo(problem.dtype).bits // 8
    tile = block_size or default_tile(problem.num_layers, problem.m, problem.symmetric, problem.device, element_bytes)
    return _token_form(problem, tile, panel_tokens(problem.widths, tile, problem.device, element_bytes))


def _check(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None,
) -> _Problem:
    inputs = check_inputs(rows, cols, kernel, gammas, pairs, centers)
    return _Problem(
        rows=inputs.rows,
        cols=inputs.cols,
        symmetric=inputs.symmetric,
        kernel=kernel,
        gammas=inputs.gammas,
        pairs=torch.tensor(inputs.pairs, dtype=torch.int64).reshape(-1, 2),
        centers=inputs.centers,
        dtype=inputs.centers[0].dtype,
        device=inputs.rows[0].device,
    )


def _chunks(n: int, size: int = CHUNK_TOKENS) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _feature_form_is_cheaper(problem: _Problem) -> bool:
    """Compare the flops of both forms of the linear kernel (GEMMs dominate both)."""
    widths = problem.widths
    involved = torch.unique(problem.pairs).numel()
    pair_widths = sum(widths[a] * widths[b] for a, b in problem.pairs.tolist())
    tile_entries = problem.m * problem.m / 2 if problem.symmetric else problem.m * problem.k
    token_flops = tile_entries * (2 * sum(widths) + 2 * involved**2 + EPILOGUE_FLOPS * len(widths))
    feature_tokens = problem.m if problem.symmetric else problem.m + problem.k
    feature_flops = 2 * feature_tokens * pair_widths + 4 * feature_tokens * sum(widths)
    return feature_flops < token_flops


# ---------------------------------------------------------------------------------------------------
# Token form


def _operand_buffers(problem: _Problem, tokens: int, order: list[int]) -> Tensor | list[Tensor]:
    """One reusable buffer per layer (in slot order) for the GEMM operands of up to `tokens` tokens
    (fresh allocations of this size would page-fault on every slab): one [L, tokens, K] tensor when
    every layer has the same width, so that a batched GEMM takes all layers at once."""
    extra = 2 if problem.rbf else 0
    widths = [problem.widths[a] + extra for a in order]
    if len(set(widths)) == 1:
        return torch.empty(len(order), tokens, widths[0], dtype=problem.dtype, device=problem.device)
    return [torch.empty(tokens, w, dtype=problem.dtype, device=problem.device) for w in widths]


def _operand(problem: _Problem, x: Tensor, a: int, row_side: bool, buffer: Tensor) -> Tensor:
    """GEMM operand of layer a for the tokens x, written into buffer[:len(x)]: x~ (linear); for RBF
    [2 s x~, -s |x~|^2, 1] on the row side and [x~, 1, -s |x~|^2] on the column side, with
    s = log2(e) gamma_a, so that row . col = log2(e) * -gamma_a |x~ - y~|^2."""
    width = x.shape[1]
    out = buffer[: x.shape[0]]
    centred = torch.sub(x, problem.centers[a], out=out[:, :width])
    if problem.rbf:
        assert problem.gammas is not None
        scale = LOG2_E * problem.gammas[a]
        neg_norms = torch.linalg.vector_norm(centred, dim=1).square_().mul_(-scale)
        norm_column, ones_column = (width, width + 1) if row_side else (width + 1, width)
        out[:, norm_column] = neg_norms
        out[:, ones_column] = 1
        if row_side:
            centred.mul_(2 * scale)
    return out


def _column_chunks(i0: int, i1: int, p0: int, p1: int, tile: int, symmetric: bool) -> Iterator[tuple[int, int, bool]]:
    """(j0, j1, on_diagonal) of the column chunks of panel [p0, p1) paired with row slab [i0, i1):
    in the symmetric case only columns j >= i0, the diagonal block [i0, i1) first."""
    start = p0
    if symmetric and i0 >= p0:
        yield i0, i1, True
        start = i1
    for j0 in range(start, p1, tile):
        yield j0, min(j0 + tile, p1), False


def _token_form(problem: _Problem, tile: int, panel: int) -> KernelSums:
    num_layers, dtype, device = problem.num_layers, problem.dtype, problem.device
    # Stage slots: the layers in pairs first, so that the Frobenius GEMM reads one contiguous block.
    involved = torch.unique(problem.pairs).tolist()
    order = involved + [a for a in range(num_layers) if a not in set(involved)]
    slot_of = {a: s for s, a in enumerate(order)}
    stage_storage = torch.empty(num_layers * tile * tile, dtype=dtype, device=device)
    # Row and column sums in slot order (plain slices of the stage's sums), reordered at the end.
    row = torch.zeros(num_layers, problem.m, dtype=torch.float64, device=device)
    col = row if problem.symmetric else torch.zeros(num_layers, problem.k, dtype=torch.float64, device=device)
    gram = torch.zeros(len(involved), len(involved), dtype=torch.float64, device=device)
    offsets: Tensor | None = None  # RBF: the first chunk's mean kernel value per slot

    column_buffers = _operand_buffers(problem, min(panel, problem.k), order)
    slab_buffers = _operand_buffers(problem, min(tile, problem.m), order)
    for p0 in range(0, problem.k, panel):
        p1 = min(p0 + panel, problem.k)
        columns = [
            _operand(problem, problem.cols[a][p0:p1], a, False, buffer)
            for a, buffer in zip(order, column_buffers, strict=True)
        ]
        for i0 in range(0, min(problem.m, p1) if problem.symmetric else problem.m, tile):
            i1 = min(i0 + tile, problem.m)
            slab = [
                _operand(problem, problem.rows[a][i0:i1], a, True, buffer)
                for a, buffer in zip(order, slab_buffers, strict=True)
            ]
            for j0, j1, on_diagonal in _column_chunks(i0, i1, p0, p1, tile, problem.symmetric):
                stage = stage_storage[: num_layers * (i1 - i0) * (j1 - j0)].view(num_layers, i1 - i0, j1 - j0)
                if isinstance(slab_buffers, Tensor):  # one width: all L tiles by one batched GEMM
                    pieces = column_buffers[:, j0 - p0 : j1 - p0].transpose(1, 2)
                    torch.bmm(slab_buffers[:, : i1 - i0], pieces, out=stage)
                else:
                    for s in range(num_layers):
                        torch.mm(slab[s], columns[s][j0 - p0 : j1 - p0].T, out=stage[s])
                if problem.rbf:
                    if on_diagonal:
                        stage.diagonal(dim1=1, dim2=2).zero_()  # exact zero distance of a token to itself
                    stage.exp2_()
                    if offsets is None:
                        offsets = stage.mean((1, 2))
                        _warn_if_flat(order, stage, on_diagonal, dtype)
                    stage.sub_(offsets[:, None, None])
                row[:, i0:i1] += stage.sum(2)
                if not on_diagonal:
                    col[:, j0:j1] += stage.sum(1)
                weight = 2.0 if problem.symmetric and not on_diagonal else 1.0
                gram += weight * stage_gram(stage[: len(involved)])

    slot_pairs = torch.tensor([[slot_of[a], slot_of[b]] for a, b in problem.pairs.tolist()], dtype=torch.int64)
    frob = gram[slot_pairs[:, 0], slot_pairs[:, 1]] if len(slot_pairs) else gram.new_zeros(0)
    slots = torch.tensor([slot_of[a] for a in range(num_layers)], device=device)
    row = row[slots]
    col = row.clone() if problem.symmetric else col[slots]
    if offsets is None:
        return KernelSums(frob=frob, row_sums=row, col_sums=col)
    return _add_offsets(problem, frob, row, col, offsets.double()[slots])


def stage_gram(tiles: Tensor) -> Tensor:
    """[S, ti, tj] -> [S, S] float64 Gram of the flattened tiles, with each float32 partial dot product
    over at most FROB_SEGMENT elements."""
    slots = tiles.shape[0]
    flat = tiles.reshape(slots, -1)
    length = flat.shape[1]
    if length <= FROB_SEGMENT:
        return (flat @ flat.T).double()
    full = length // FROB_SEGMENT * FROB_SEGMENT
    segments = flat[:, :full].view(slots, -1, FROB_SEGMENT).transpose(0, 1)
    gram = torch.bmm(segments, segments.transpose(1, 2)).double().sum(0)
    if full < length:
        rest = flat[:, full:]
        gram += (rest @ rest.T).double()
    return gram


def _warn_if_flat(order: list[int], stage: Tensor, on_diagonal: bool, dtype: torch.dtype) -> None:
    """Warn when a float32 RBF chunk is nearly all ones off its diagonal (judged on at least 64 entries)."""
    diagonal = min(stage.shape[1:]) if on_diagonal else 0
    entries = stage[0].numel() - diagonal
    if dtype != torch.float32 or entries < 64:
        return
    for slot, layer in enumerate(order):
        mean_kernel = (float(stage[slot].sum()) - diagonal) / entries
        if mean_kernel > FLAT_KERNEL_MEAN:
            warnings.warn(
                f"rbf kernel of layer {layer}: mean kernel value {mean_kernel:.6f} > {FLAT_KERNEL_MEAN} (sigma is "
                "large against the token distances), so float32 tiles keep few digits of the kernel's variation; "
                "pass float64 activations, or use the linear kernel, the limit of RBF as sigma -> infinity",
                RuntimeWarning,
                stacklevel=4,
            )


def _add_offsets(problem: _Problem, frob: Tensor, row: Tensor, col: Tensor, c: Tensor) -> KernelSums:
    """Sums of K = D + c from those of the staged D = K - c, in float64."""
    m, k = problem.m, problem.k
    a, b = problem.pairs[:, 0].to(problem.device), problem.pairs[:, 1].to(problem.device)
    totals = row.sum(1)  # 1^T D_a 1
    frob = frob + c[b] * totals[a] + c[a] * totals[b] + m * k * c[a] * c[b]
    row_sums = row + k * c[:, None]
    col_sums = row_sums.clone() if problem.symmetric else col + m * c[:, None]
    return KernelSums(frob=frob, row_sums=row_sums, col_sums=col_sums)


# ---------------------------------------------------------------------------------------------------
# Feature form (linear kernel)


def _feature_form(problem: _Problem) -> KernelSums:
    """Linear kernel through d_a x d_b accumulators. Pairs are processed in batches whose float64
    accumulators fit the panel budget; each batch is one pass over the tokens."""
    device, widths = problem.device, problem.widths
    budget = PANEL_BYTES.get(device.type, PANEL_BYTES["cpu"])
    per_pair = [widths[a] * widths[b] * 8 * (1 if problem.symmetric else 2) for a, b in problem.pairs.tolist()]
    frob = torch.zeros(len(per_pair), dtype=torch.float64, device=device)
    batch: list[int] = []
    for p in range(len(per_pair) + 1):
        if p == len(per_pair) or (batch and sum(per_pair[q] for q in batch) + per_pair[p] > budget):
            if batch:
                row_cross = _cross_products(problem, problem.rows, batch)
                col_cross = row_cross if problem.symmetric else _cross_products(problem, problem.cols, batch)
                for q, a_b, c_d in zip(batch, row_cross, col_cross, strict=True):
                    frob[q] = (a_b * c_d).sum()
            batch = []
        if p < len(per_pair):
            batch.append(p)
    row_totals = _centred_sums(problem, problem.rows)
    col_totals = row_totals if problem.symmetric else _centred_sums(problem, problem.cols)
    row = _project(problem, problem.rows, col_totals)
    col = row.clone() if problem.symmetric else _project(problem, problem.cols, row_totals)
    return KernelSums(frob=frob, row_sums=row, col_sums=col)


def _centred(problem: _Problem, x: Tensor, a: int) -> Tensor:
    return torch.sub(x.to(problem.dtype), problem.centers[a])


def _cross_products(problem: _Problem, side: Sequence[Tensor], batch: list[int]) -> list[Tensor]:
    """X~_a^T X~_b in float64 for the pairs in `batch`, each chunk's product taken in the compute dtype."""
    pairs = [tuple(problem.pairs[q].tolist()) for q in batch]
    layers = sorted({a for pair in pairs for a in pair})
    out = [
        torch.zeros(problem.widths[a], problem.widths[b], dtype=torch.float64, device=problem.device) for a, b in pairs
    ]
    for s, e in _chunks(side[0].shape[0]):
        centred = {a: _centred(problem, side[a][s:e], a) for a in layers}
        for acc, (a, b) in zip(out, pairs, strict=True):
            acc += (centred[a].T @ centred[b]).double()
    return out


def _centred_sums(problem: _Problem, side: Sequence[Tensor]) -> list[Tensor]:
    """sum_i x~_ai in float64 per layer."""
    totals = []
    for a, x in enumerate(side):
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=problem.device)
        for s, e in _chunks(x.shape[0]):
            total += _centred(problem, x[s:e], a).sum(0, dtype=torch.float64)
        totals.append(total)
    return totals


def _project(problem: _Problem, side: Sequence[Tensor], totals: list[Tensor]) -> Tensor:
    """[L, n] float64: x~_i . t_a for every token i of `side` (the row sums of X~ Y~^T)."""
    out = torch.empty(problem.num_layers, side[0].shape[0], dtype=torch.float64, device=problem.device)
    for a, (x, total) in enumerate(zip(side, totals, strict=True)):
        for s, e in _chunks(x.shape[0]):
            out[a, s:e] = _centred(problem, x[s:e], a).double() @ total
    return out
