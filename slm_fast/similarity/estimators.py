"""HSIC and CKA from kernel sums: the biased and unbiased estimators, and the NaN policy.

With K_a the n x n kernel matrix of layer a, r_a = K_a 1 its row sums and delta_a its diagonal:
    biased   HSIC(a, b) = [T_ab - (2/n) r_a.r_b + (1.r_a)(1.r_b)/n^2] / (n-1)^2,  T_ab = sum_ij K_a K_b
(= tr(K_a H K_b H) / (n-1)^2). The unbiased estimator (Song et al. 2012; equal to Szekely-Rizzo
U-centering) uses the same sums of K~ = K with a zeroed diagonal:
    HSIC_1(a, b) = [T~_ab + (1.r~_a)(1.r~_b)/((n-1)(n-2)) - 2 r~_a.r~_b/(n-2)] / (n(n-3))
where T~ = T - delta_a.delta_b and r~ = r - delta: the diagonal terms are subtracted from the sums
(delta = |x_i|^2 for the linear kernel, 1 for RBF), so no backend special-cases the diagonal.
CKA(a, b) = HSIC(a, b) / sqrt(HSIC(a, a) HSIC(b, b)).

NaN policy. A layer whose HSIC(a, a) is zero (constant activations, or zero within the float64 rounding
of the centering) has no CKA: its row and column are NaN and a RuntimeWarning names it. Entries of pairs
that were not requested are NaN. The diagonal is 1 for every layer named by a requested pair unless
that layer is degenerate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# HSIC(a, a) at or below this fraction of its largest centering term is float64 rounding, not signal.
DEGENERATE_FRACTION = 64 * torch.finfo(torch.float64).eps
# Below this fraction fewer than about 7 significant digits survive the float64 centering: warn.
PRECISION_FRACTION = 1e-9


class PairStats(NamedTuple):
    """Every reduction the estimators need, per pair p = (a, b) and per layer, in float64."""

    num_tokens: int
    pairs: Tensor  # [P, 2] int64, CPU
    frob: Tensor  # [P] sum_ij K_a[i, j] K_b[i, j]
    row_dot: Tensor  # [P] r_a . r_b
    row_diag: Tensor  # [P] r_a . delta_b
    diag_row: Tensor  # [P] delta_a . r_b
    diag_dot: Tensor  # [P] delta_a . delta_b
    totals: Tensor  # [L] 1 . r_a
    diag_totals: Tensor  # [L] 1 . delta_a


def stats_from_row_sums(
    num_tokens: int, pairs: Tensor, frob: Tensor, row_sums: Tensor, diagonal: Tensor | None
) -> PairStats:
    """PairStats from the n-long row sums [L, n] and diagonals [L, n] (None: all ones, as for RBF)."""
    device = row_sums.device
    a, b = pairs[:, 0].to(device), pairs[:, 1].to(device)
    totals = row_sums.sum(1)
    row_dot = (row_sums @ row_sums.T)[a, b]
    if diagonal is None:
        row_diag, diag_row = totals[a], totals[b]
        diag_dot = torch.full_like(frob, float(num_tokens))
        diag_totals = torch.full_like(totals, float(num_tokens))
    else:
        cross = row_sums @ diagonal.T
        row_diag, diag_row = cross[a, b], cross[b, a]
        diag_dot = (diagonal @ diagonal.T)[a, b]
        diag_totals = diagonal.sum(1)
    return PairStats(num_tokens, pairs, frob, row_dot, row_diag, diag_row, diag_dot, totals, diag_totals)


def pair_hsic(stats: PairStats, unbiased: bool) -> tuple[Tensor, Tensor]:
    """(HSIC per pair, the largest magnitude among its centering terms, used to judge rounding)."""
    n = stats.num_tokens
    a, b = stats.pairs[:, 0].to(stats.frob.device), stats.pairs[:, 1].to(stats.frob.device)
    if not unbiased:
        terms = (stats.frob, -2 * stats.row_dot / n, stats.totals[a] * stats.totals[b] / n**2)
        denominator = (n - 1) ** 2
    else:
        frob = stats.frob - stats.diag_dot
        row_dot = stats.row_dot - stats.row_diag - stats.diag_row + stats.diag_dot
        total_a = stats.totals[a] - stats.diag_totals[a]
        total_b = stats.totals[b] - stats.diag_totals[b]
        terms = (frob, total_a * total_b / ((n - 1) * (n - 2)), -2 * row_dot / (n - 2))
        denominator = n * (n - 3)
    value = (terms[0] + terms[1] + terms[2]) / denominator
    scale = torch.stack([t.abs() for t in terms]).amax(0) / denominator
    return value, scale


def similarity_matrices(
    num_layers: int, stats: PairStats, unbiased: bool, constant_layers: Sequence[bool]
) -> tuple[Tensor, Tensor]:
    """(CKA, HSIC) as [L, L] float64 on the CPU, NaN where undefined or not requested.

    `stats.pairs` must hold (a, a) for every layer it names; see the module docstring for the NaN policy.
    """
    values, scales = pair_hsic(stats, unbiased)
    values, scales = values.double().cpu(), scales.double().cpu()
    hsic = torch.full((num_layers, num_layers), float("nan"), dtype=torch.float64)
    a, b = stats.pairs[:, 0], stats.pairs[:, 1]
    hsic[a, b] = values
    hsic[b, a] = values

    self_hsic = hsic.diagonal().clone()
    self_scale = torch.full((num_layers,), float("nan"), dtype=torch.float64)
    on_diagonal = a == b
    self_scale[a[on_diagonal]] = scales[on_diagonal]
    degenerate = []
    for layer in torch.unique(a[on_diagonal]).tolist():
        if constant_layers[layer]:
            degenerate.append(layer)
            warnings.warn(
                f"layer {layer} has constant activations (every token equal): its HSIC is 0 and its CKA values are NaN",
                RuntimeWarning,
                stacklevel=3,
            )
        elif not self_hsic[layer] > DEGENERATE_FRACTION * self_scale[layer]:
            degenerate.append(layer)
            warnings.warn(
                f"layer {layer}: HSIC(a, a) = {float(self_hsic[layer]):.3e} is zero within float64 rounding "
                f"(its centering terms reach {float(self_scale[layer]):.3e}): its CKA values are NaN",
                RuntimeWarning,
                stacklevel=3,
            )
        elif self_hsic[layer] < PRECISION_FRACTION * self_scale[layer]:
            ratio = float(self_hsic[layer] / self_scale[layer])
            warnings.warn(
                f"layer {layer}: HSIC(a, a) is only {ratio:.1e} of its centering terms, so about "
                f"{16 + math.log10(ratio):.0f} significant digits survive the float64 centering (activations "
                "whose mean is far larger than their spread); subtract each layer's token mean first for "
                "full precision",
                RuntimeWarning,
                stacklevel=3,
            )
    self_hsic[degenerate] = float("nan")
    cka = hsic / torch.sqrt(self_hsic[:, None] * self_hsic[None, :])
    defined = (~torch.isnan(self_hsic)).nonzero().squeeze(1)
    cka[defined, defined] = 1.0
    return cka, hsic
