"""Plain-torch oracle of the kernel-sums contract (slm_fast/kernels/__init__.py): materialises every
kernel matrix in float64. For tests only, at small n."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums


def kernel_matrix(rows: Tensor, cols: Tensor, kernel: str, gamma: float | None) -> Tensor:
    """K[i, j] = k(rows[i], cols[j]) in float64."""
    x, y = rows.double(), cols.double()
    if kernel == "linear":
        return x @ y.T
    if kernel == "rbf":
        return torch.exp(-gamma * torch.cdist(x, y).square())
    raise ValueError(kernel)


def oracle_kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
) -> KernelSums:
    cols = rows if cols is None else cols
    gammas = [None] * len(rows) if gammas is None else list(gammas)
    mats = [kernel_matrix(r, c, kernel, g) for r, c, g in zip(rows, cols, gammas, strict=True)]
    frob = [(mats[a] * mats[b]).sum() for a, b in pairs.tolist()]
    return KernelSums(
        frob=torch.stack(frob) if frob else torch.zeros(0, dtype=torch.float64),
        row_sums=torch.stack([m.sum(1) for m in mats]),
        col_sums=torch.stack([m.sum(0) for m in mats]),
    )
