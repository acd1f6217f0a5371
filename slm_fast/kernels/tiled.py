"""Tiled torch backend of the kernel-sums contract (see slm_fast/kernels/__init__.py): CPU and CUDA,
memory O(n) beyond the inputs.

Token form (both kernels). One pass over token tiles (I, J), J >= I in the symmetric case. For each
tile and layer one GEMM yields the kernel tile; for RBF the GEMM yields the exponent
-gamma |x - y|^2 directly through two augmented columns, followed by one exp. The L tiles of one
(I, J) are staged side by side and every Frobenius product comes from one batched GEMM of the stage
with itself (each partial dot product spans FROB_SEGMENT elements, then float64).

Feature form (linear kernel), used when cheaper (many tokens, small d, few pairs):
sum_ij (x_ai.y_aj)(x_bi.y_bj) = <X_a^T X_b, Y_a^T Y_b>_F, streamed over token chunks into float64
d_a x d_b accumulators.

Numerics. Products are float32 (float64 when an input is float64) and reduced into float64. Two exact
rewrites keep the float32 quantities small, so that the large cancellations of HSIC centering happen in
float64 later:
- each layer is shifted by its token mean mu before any product. RBF is translation invariant; for the
  linear kernel x.y = x~.y~ + x~.mu + mu.y~ + mu.mu and the last three terms are added back in float64;
- RBF tiles are staged as K - c, with c the mean kernel value of the first tile, and c is added back
  in float64.
So both forms reduce a "deviation" matrix D, and `_add_structure` returns the sums of
K = D + u 1^T + 1 v^T + c.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums, check_inputs

# Largest token tile per device type; the workspace budget may choose a smaller one.
MAX_TILE = {"cpu": 1024, "cuda": 4096}
WORKSPACE_BYTES = {"cpu": 512 * 2**20, "cuda": 2 * 2**30}
TILE_ALIGN = 32
# Rows of a kernel tile computed and exponentiated at a time, so that each piece stays in cache.
EPILOGUE_ROWS = 256
# Elements per partial dot product of the staged Frobenius GEMM before the float64 reduction.
FROB_SEGMENT = 8192
# Tokens per chunk of the passes that stream over tokens (means, norms, feature-form products).
CHUNK_TOKENS = 4096
# Cost of the RBF epilogue (exp, offset, row and column sums) per kernel entry, in GEMM-flop units;
# used only to choose between the token and feature forms of the linear kernel.
EPILOGUE_FLOPS = 16
# Mean RBF kernel value above which float32 tiles keep too few digits of the kernel's variation.
FLAT_KERNEL_MEAN = 0.99


def unavailable_reason(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch was built without CUDA or sees no GPU"
    return f"the tiled backend needs float64 accumulators, which it supports on cpu and cuda only, not {device.type}"


def choose_block_size(num_layers: int, widths: Sequence[int], device: torch.device, element_bytes: int = 4) -> int:
    """Token tile t such that the workspace (L staged t x t tiles, one prepared row tile per layer and
    one column tile) fits WORKSPACE_BYTES[device], capped at MAX_TILE[device]."""
    budget = WORKSPACE_BYTES.get(device.type, WORKSPACE_BYTES["cpu"]) // element_bytes
    per_token = sum(widths) + 2 * num_layers + max(widths) + 2
    # num_layers t^2 + per_token t <= budget
    t = (-per_token + math.sqrt(per_token**2 + 4 * num_layers * budget)) / (2 * num_layers)
    t = int(t) // TILE_ALIGN * TILE_ALIGN
    return max(TILE_ALIGN, min(MAX_TILE.get(device.type, MAX_TILE["cpu"]), t))


@dataclass(frozen=True)
class _Problem:
    rows: Sequence[Tensor]
    cols: Sequence[Tensor]  # `rows` itself in the symmetric case
    symmetric: bool
    kernel: str
    gammas: list[float] | None
    pairs: Tensor  # [P, 2] int64 on the CPU
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


@dataclass
class _Side:
    """Per-layer float64 facts about the rows or the columns: u_i = x~_i . mu (linear), -gamma |x~_i|^2
    (rbf, compute dtype) and sum_i x~_i (linear)."""

    u: list[Tensor] | None
    neg_gamma_norms: list[Tensor] | None
    sums: list[Tensor] | None


@dataclass
class _DeviationSums:
    frob: Tensor  # [P] float64, sum of D_a * D_b for each pair
    row: Tensor  # [L, m] float64, D_a 1
    col: Tensor  # [L, k] float64, D_a^T 1 (the same tensor as `row` in the symmetric case)
    offsets: Tensor  # [L] float64, the constant c added back (0 for the linear kernel)


def kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    block_size: int | None = None,
) -> KernelSums:
    problem = _check(rows, cols, kernel, gammas, pairs)
    if problem.m == 0 or problem.k == 0:
        zeros = torch.zeros
        return KernelSums(
            frob=zeros(len(problem.pairs), dtype=torch.float64, device=problem.device),
            row_sums=zeros(problem.num_layers, problem.m, dtype=torch.float64, device=problem.device),
            col_sums=zeros(problem.num_layers, problem.k, dtype=torch.float64, device=problem.device),
        )
    means = _layer_means(problem)
    row_side = _side_facts(problem, problem.rows, means)
    col_side = row_side if problem.symmetric else _side_facts(problem, problem.cols, means)
    if problem.kernel == "linear" and _feature_form_is_cheaper(problem):
        dev = _feature_form(problem, means, row_side, col_side)
    else:
        element_bytes = torch.finfo(problem.dtype).bits // 8
        tile = block_size or choose_block_size(problem.num_layers, problem.widths, problem.device, element_bytes)
        if problem.symmetric and not block_size:
            # Diagonal tiles are computed whole: keep that waste (t / n of the work) under 1/8.
            tile = max(TILE_ALIGN, min(tile, problem.m // 8 // TILE_ALIGN * TILE_ALIGN))
        dev = _token_form(problem, means, row_side, col_side, tile)
    if problem.kernel == "linear":
        offsets = torch.stack([(mu.double() * mu.double()).sum() for mu in means])
        return _add_structure(problem, dev, row_side.u, col_side.u, offsets)
    return _add_structure(problem, dev, None, None, dev.offsets)


def _check(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
) -> _Problem:
    rows, cols_list, symmetric, gammas, pair_list = check_inputs(rows, cols, kernel, gammas, pairs)
    pairs = torch.tensor(pair_list, dtype=torch.int64).reshape(-1, 2)
    wide = any(x.dtype == torch.float64 for x in [*rows, *cols_list])
    return _Problem(
        rows=rows,
        cols=cols_list,
        symmetric=symmetric,
        kernel=kernel,
        gammas=gammas,
        pairs=pairs,
        dtype=torch.float64 if wide else torch.float32,
        device=rows[0].device,
    )


def _chunks(n: int, size: int = CHUNK_TOKENS) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _layer_means(problem: _Problem) -> list[Tensor]:
    """Token mean of each layer over rows and cols, rounded to the compute dtype (any shift is exact
    algebra; it only has to be near the mean)."""
    means = []
    for a in range(problem.num_layers):
        sides = [problem.rows[a]] if problem.symmetric else [problem.rows[a], problem.cols[a]]
        total = torch.zeros(problem.widths[a], dtype=torch.float64, device=problem.device)
        count = 0
        for x in sides:
            for s, e in _chunks(x.shape[0]):
                total += x[s:e].to(problem.dtype).sum(0).double()
            count += x.shape[0]
        means.append((total / count).to(problem.dtype))
    return means


def _shifted(x: Tensor, mu: Tensor, out: Tensor | None = None) -> Tensor:
    """x - mu in mu's dtype (one pass, converting bf16/fp16 on the fly)."""
    return torch.sub(x, mu, out=out) if out is not None else torch.sub(x.to(mu.dtype), mu)


def _side_facts(problem: _Problem, side: Sequence[Tensor], means: list[Tensor]) -> _Side:
    facts = _Side(u=None, neg_gamma_norms=None, sums=None)
    if problem.kernel == "linear":
        facts.u, facts.sums = [], []
        for x, mu in zip(side, means, strict=True):
            u = torch.empty(x.shape[0], dtype=torch.float64, device=problem.device)
            total = torch.zeros(x.shape[1], dtype=torch.float64, device=problem.device)
            for s, e in _chunks(x.shape[0]):
                xs = _shifted(x[s:e], mu)
                u[s:e] = (xs @ mu).double()
                total += xs.sum(0).double()
            facts.u.append(u)
            facts.sums.append(total)
    else:
        assert problem.gammas is not None
        facts.neg_gamma_norms = []
        for x, mu, gamma in zip(side, means, problem.gammas, strict=True):
            norms = torch.empty(x.shape[0], dtype=problem.dtype, device=problem.device)
            for s, e in _chunks(x.shape[0]):
                norms[s:e] = torch.linalg.vector_norm(_shifted(x[s:e], mu), dim=1).square_()
            facts.neg_gamma_norms.append(norms.mul_(-gamma))
    return facts


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


def _token_form(problem: _Problem, means: list[Tensor], row_side: _Side, col_side: _Side, tile: int) -> _DeviationSums:
    m, k, num_layers, dtype, device = problem.m, problem.k, problem.num_layers, problem.dtype, problem.device
    rbf = problem.kernel == "rbf"
    extra = 2 if rbf else 0
    # Stage slots: the layers in pairs first, so that the Frobenius GEMM reads one contiguous block.
    involved = torch.unique(problem.pairs).tolist()
    order = involved + [a for a in range(num_layers) if a not in set(involved)]
    slot_of = {a: s for s, a in enumerate(order)}
    tile_rows, tile_cols = min(tile, m), min(tile, k)
    stage = torch.empty(num_layers * tile_rows * tile_cols, dtype=dtype, device=device)
    row_tiles = [torch.empty(tile_rows, w + extra, dtype=dtype, device=device) for w in problem.widths]
    col_buffer = torch.empty(tile_cols * (max(problem.widths) + extra), dtype=dtype, device=device)

    gram = torch.zeros(len(involved), len(involved), dtype=torch.float64, device=device)
    row = torch.zeros(num_layers, m, dtype=torch.float64, device=device)
    col = row if problem.symmetric else torch.zeros(num_layers, k, dtype=torch.float64, device=device)
    offsets = torch.zeros(num_layers, dtype=dtype, device=device)  # RBF: the first tile's mean kernel value

    for i0 in range(0, m, tile_rows):
        i1 = min(i0 + tile_rows, m)
        for a in range(num_layers):
            _prepare_rows(problem, a, i0, i1, means[a], row_side, row_tiles[a])
        for j0 in range(i0, m, tile_cols) if problem.symmetric else range(0, k, tile_cols):
            j1 = min(j0 + tile_cols, k)
            on_diagonal = problem.symmetric and j0 == i0
            tiles = stage[: num_layers * (i1 - i0) * (j1 - j0)].view(num_layers, i1 - i0, j1 - j0)
            # Each layer's tile gets its whole epilogue while it is still in cache.
            for a in range(num_layers):
                x = row_tiles[a][: i1 - i0]
                if on_diagonal and not rbf:
                    y = x
                else:
                    y = col_buffer[: (j1 - j0) * x.shape[1]].view(j1 - j0, x.shape[1])
                    _prepare_cols(problem, a, j0, j1, means[a], col_side, y)
                out = tiles[slot_of[a]]
                row_sums = row[a, i0:i1]
                col_sums = None if on_diagonal else col[a, j0:j1]
                first = rbf and i0 == 0 and j0 == 0  # the tile that fixes the RBF offset
                for r0 in range(0, i1 - i0, EPILOGUE_ROWS):
                    r1 = min(r0 + EPILOGUE_ROWS, i1 - i0)
                    _kernel_rows(x[r0:r1], y, out[r0:r1], rbf, r0 if on_diagonal else None)
                    if not first:
                        _reduce(out[r0:r1], offsets[a] if rbf else None, row_sums[r0:r1], col_sums)
                if first:
                    offsets[a] = out.mean()
                    _warn_if_flat(a, out, on_diagonal, dtype)
                    _reduce(out, offsets[a], row_sums, col_sums)
            weight = 2.0 if problem.symmetric and not on_diagonal else 1.0
            gram += weight * _stage_gram(tiles[: len(involved)])

    slot_pairs = torch.tensor([[slot_of[a], slot_of[b]] for a, b in problem.pairs.tolist()], dtype=torch.int64)
    frob = gram[slot_pairs[:, 0], slot_pairs[:, 1]] if len(slot_pairs) else gram.new_zeros(0)
    return _DeviationSums(frob=frob, row=row, col=col, offsets=offsets.double())


def _kernel_rows(x: Tensor, y: Tensor, out: Tensor, rbf: bool, diagonal_offset: int | None) -> None:
    """out = x y^T, then for RBF exp(.) with the tile's diagonal (if it crosses it) set to exactly 1."""
    torch.mm(x, y.T, out=out)
    if rbf:
        if diagonal_offset is not None:
            out.diagonal(diagonal_offset).zero_()  # exact zero distance of a token to itself
        out.exp_()


def _reduce(piece: Tensor, offset: Tensor | None, row_sums: Tensor, col_sums: Tensor | None) -> None:
    """Subtract the RBF offset in place and add the piece's row (and column) sums to float64 slices."""
    if offset is not None:
        piece.sub_(offset)
    row_sums += piece.sum(1)
    if col_sums is not None:
        col_sums += piece.sum(0)


def _prepare_rows(problem: _Problem, a: int, i0: int, i1: int, mu: Tensor, side: _Side, out: Tensor) -> None:
    """Row tile of layer a: x~ (linear) or [2 gamma x~, -gamma |x~|^2, 1] (rbf)."""
    width = problem.widths[a]
    out = out[: i1 - i0]
    _shifted(problem.rows[a][i0:i1], mu, out=out[:, :width])
    if problem.kernel == "rbf":
        assert problem.gammas is not None and side.neg_gamma_norms is not None
        out[:, :width].mul_(2 * problem.gammas[a])
        out[:, width] = side.neg_gamma_norms[a][i0:i1]
        out[:, width + 1] = 1


def _prepare_cols(problem: _Problem, a: int, j0: int, j1: int, mu: Tensor, side: _Side, out: Tensor) -> None:
    """Column tile of layer a: y~ (linear) or [y~, 1, -gamma |y~|^2] (rbf)."""
    width = problem.widths[a]
    _shifted(problem.cols[a][j0:j1], mu, out=out[:, :width])
    if problem.kernel == "rbf":
        assert side.neg_gamma_norms is not None
        out[:, width] = 1
        out[:, width + 1] = side.neg_gamma_norms[a][j0:j1]


def _stage_gram(tiles: Tensor) -> Tensor:
    """[S, ti, tj] -> [S, S] float64 Gram of the flattened tiles, with each float32 partial dot product
    over at most FROB_SEGMENT elements."""
    slots = tiles.shape[0]
    flat = tiles.reshape(slots, -1)
    length = flat.shape[1]
    full = length // FROB_SEGMENT * FROB_SEGMENT
    gram = torch.zeros(slots, slots, dtype=torch.float64, device=tiles.device)
    if full:
        segments = flat[:, :full].view(slots, -1, FROB_SEGMENT).transpose(0, 1)
        gram += torch.bmm(segments, segments.transpose(1, 2)).double().sum(0)
    if full < length:
        rest = flat[:, full:]
        gram += (rest @ rest.T).double()
    return gram


def _warn_if_flat(layer: int, tile: Tensor, on_diagonal: bool, dtype: torch.dtype) -> None:
    """Warn when a float32 RBF tile is nearly all ones off its diagonal (judged on at least 64 entries)."""
    diagonal = min(tile.shape) if on_diagonal else 0
    entries = tile.numel() - diagonal
    if dtype != torch.float32 or entries < 64:
        return
    mean_kernel = (float(tile.sum()) - diagonal) / entries
    if mean_kernel > FLAT_KERNEL_MEAN:
        warnings.warn(
            f"rbf kernel of layer {layer}: mean kernel value {mean_kernel:.6f} > {FLAT_KERNEL_MEAN} (sigma is "
            "large against the token distances), so float32 tiles keep few digits of the kernel's variation; "
            "pass float64 activations, or use the linear kernel, the limit of RBF as sigma -> infinity",
            RuntimeWarning,
            stacklevel=4,
        )


def _feature_form(problem: _Problem, means: list[Tensor], row_side: _Side, col_side: _Side) -> _DeviationSums:
    """Linear kernel through d_a x d_b accumulators. Pairs are processed in batches whose float64
    accumulators fit the workspace budget; each batch is one pass over the tokens."""
    assert row_side.sums is not None and col_side.sums is not None
    device, widths = problem.device, problem.widths
    budget = WORKSPACE_BYTES.get(device.type, WORKSPACE_BYTES["cpu"])
    per_pair = [widths[a] * widths[b] * 8 * (1 if problem.symmetric else 2) for a, b in problem.pairs.tolist()]
    frob = torch.zeros(len(per_pair), dtype=torch.float64, device=device)
    batch: list[int] = []
    for p in range(len(per_pair) + 1):
        if p == len(per_pair) or (batch and sum(per_pair[q] for q in batch) + per_pair[p] > budget):
            if batch:
                row_cross = _cross_products(problem, problem.rows, means, batch)
                col_cross = row_cross if problem.symmetric else _cross_products(problem, problem.cols, means, batch)
                for q, a_b, c_d in zip(batch, row_cross, col_cross, strict=True):
                    frob[q] = (a_b * c_d).sum()
            batch = []
        if p < len(per_pair):
            batch.append(p)
    row = _project(problem.rows, means, col_side.sums, problem)
    col = row if problem.symmetric else _project(problem.cols, means, row_side.sums, problem)
    offsets = torch.zeros(problem.num_layers, dtype=torch.float64, device=device)
    return _DeviationSums(frob=frob, row=row, col=col, offsets=offsets)


def _cross_products(problem: _Problem, side: Sequence[Tensor], means: list[Tensor], batch: list[int]) -> list[Tensor]:
    """X~_a^T X~_b in float64 for the pairs in `batch`, each chunk's product taken in the compute dtype."""
    pairs = [tuple(problem.pairs[q].tolist()) for q in batch]
    layers = sorted({a for pair in pairs for a in pair})
    out = [
        torch.zeros(problem.widths[a], problem.widths[b], dtype=torch.float64, device=problem.device) for a, b in pairs
    ]
    for s, e in _chunks(side[0].shape[0]):
        shifted = {a: _shifted(side[a][s:e], means[a]) for a in layers}
        for acc, (a, b) in zip(out, pairs, strict=True):
            acc += (shifted[a].T @ shifted[b]).double()
    return out


def _project(side: Sequence[Tensor], means: list[Tensor], sums: list[Tensor], problem: _Problem) -> Tensor:
    """[L, n] float64: x~_i . s_a for every token i of `side` (row sums of D = X~ Y~^T)."""
    out = torch.empty(problem.num_layers, side[0].shape[0], dtype=torch.float64, device=problem.device)
    for a, (x, mu, total) in enumerate(zip(side, means, sums, strict=True)):
        for s, e in _chunks(x.shape[0]):
            out[a, s:e] = _shifted(x[s:e], mu).double() @ total
    return out


def _add_structure(
    problem: _Problem, dev: _DeviationSums, u: list[Tensor] | None, v: list[Tensor] | None, offsets: Tensor
) -> KernelSums:
    """Sums of K = D + u 1^T + 1 v^T + c from those of D, in float64."""
    m, k = problem.m, problem.k
    a, b = problem.pairs[:, 0].to(problem.device), problem.pairs[:, 1].to(problem.device)
    c = offsets
    totals = dev.row.sum(1)  # 1^T D_a 1
    frob = dev.frob + c[b] * totals[a] + c[a] * totals[b] + m * k * c[a] * c[b]
    row_sums = dev.row + k * c[:, None]
    col_sums = dev.col + m * c[:, None]
    if u is not None and v is not None:
        uu, vv = torch.stack(u), torch.stack(v)
        su, sv = uu.sum(1), vv.sum(1)
        row_u = dev.row @ uu.T  # [L, L]: (D_a 1) . u_b
        col_v = dev.col @ vv.T
        frob = (
            frob
            + row_u[a, b] + col_v[a, b] + row_u[b, a] + col_v[b, a]
            + k * (uu @ uu.T)[a, b] + m * (vv @ vv.T)[a, b]
            + su[a] * sv[b] + sv[a] * su[b]
            + c[b] * (k * su[a] + m * sv[a]) + c[a] * (k * su[b] + m * sv[b])
        )  # fmt: skip
        row_sums = row_sums + k * uu + sv[:, None]
        col_sums = col_sums + m * vv + su[:, None]
    return KernelSums(frob=frob, row_sums=row_sums, col_sums=col_sums)
