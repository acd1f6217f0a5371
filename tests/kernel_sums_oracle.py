"""Plain-torch oracle of the kernel-sums contract (slm_fast/kernels/__init__.py): centres every layer
in float64 on the contract's centre, then materialises every kernel matrix in float64. For tests only,
at small n."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.kernels import KernelSums, layer_centers


def kernel_matrix(rows: Tensor, cols: Tensor, kernel: str, gamma: float | None) -> Tensor:
    """K[i, j] = k(rows[i], cols[j]) in float64."""
    x, y = rows.double(), cols.double()
    if kernel == "linear":
        return x @ y.T
    if kernel == "rbf":
        return torch.exp(-gamma * torch.cdist(x, y).square())
    raise ValueError(kernel)


def _centred(
    rows: Sequence[Tensor], cols: Sequence[Tensor] | None, centers: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    centred_rows = [r.double() - c.double().to(r.device) for r, c in zip(rows, centers, strict=True)]
    if cols is None:
        return centred_rows, centred_rows
    return centred_rows, [x.double() - c.double().to(x.device) for x, c in zip(cols, centers, strict=True)]


def oracle_kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
) -> KernelSums:
    """The contract's sums; `centers` None means the contract's default (`layer_centers`)."""
    centers = layer_centers(rows, cols) if centers is None else centers
    centred_rows, centred_cols = _centred(rows, cols, centers)
    gammas = [None] * len(rows) if gammas is None else list(gammas)
    mats = [kernel_matrix(r, c, kernel, g) for r, c, g in zip(centred_rows, centred_cols, gammas, strict=True)]
    frob = [(mats[a] * mats[b]).sum() for a, b in pairs.tolist()]
    return KernelSums(
        frob=torch.stack(frob) if frob else torch.zeros(0, dtype=torch.float64),
        row_sums=torch.stack([m.sum(1) for m in mats]),
        col_sums=torch.stack([m.sum(0) for m in mats]),
    )


def oracle_magnitudes(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
) -> KernelSums:
    """The same sums over the scale of each entry's rounding error: |x~||y~| for the linear kernel (a
    dot product's error is proportional to it), 1 for RBF (its entries lie in [0, 1], and backends
    may stage K - c with c in [0, 1]). A floating-point evaluation's error is proportional to these."""
    centers = layer_centers(rows, cols) if centers is None else centers
    centred = _centred(rows, cols, centers)
    if kernel == "linear":
        mats = [r.norm(dim=1)[:, None] * c.norm(dim=1)[None, :] for r, c in zip(*centred, strict=True)]
    else:
        mats = [torch.ones(len(r), len(c), dtype=torch.float64) for r, c in zip(*centred, strict=True)]
    frob = [(mats[a] * mats[b]).sum() for a, b in pairs.tolist()]
    return KernelSums(
        frob=torch.stack(frob) if frob else torch.zeros(0, dtype=torch.float64),
        row_sums=torch.stack([m.sum(1) for m in mats]),
        col_sums=torch.stack([m.sum(0) for m in mats]),
    )
