"""n x n oracles of HSIC and CKA in float64, written from the textbook formulas (Kornblith et al.'s
reference code, Song et al. 2012), for tests and the benchmark's memory comparison only, at small n."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def squared_distances(x: Tensor) -> Tensor:
    x = x.double()
    norms = x.square().sum(1)
    return (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0).fill_diagonal_(0)


def gram_linear(x: Tensor) -> Tensor:
    x = x.double()
    return x @ x.T


def gram_rbf(x: Tensor, sigma: float) -> Tensor:
    return torch.exp(-squared_distances(x) / (2 * sigma**2))


def centered(k: Tensor) -> Tensor:
    """H K H with H = I - 11^T / n."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return h @ k @ h


def u_centered(k: Tensor) -> Tensor:
    """Szekely-Rizzo U-centering, as Kornblith's `center_gram(unbiased=True)`."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    return k.fill_diagonal_(0)


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:
    return (centered(k) * centered(l)).sum() / (k.shape[0] - 1) ** 2


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Song et al.'s formula on the zero-diagonal kernels."""
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    ones = torch.ones(n, dtype=torch.float64)
    value = (
        (k * l).sum()
        + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
        - 2 * (ones @ k @ l @ ones) / (n - 2)
    )
    return value / (n * (n - 3))


def hsic_u_centered(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    return (u_centered(k) * u_centered(l)).sum() / (n * (n - 3))


def grams(layers: Sequence[Tensor], kernel: str, sigmas: Sequence[float] | None = None) -> list[Tensor]:
    if kernel == "linear":
        return [gram_linear(x) for x in layers]
    assert sigmas is not None
    return [gram_rbf(x, s) for x, s in zip(layers, sigmas, strict=True)]


def hsic_matrix(layers: Sequence[Tensor], kernel: str, sigmas: Sequence[float] | None, unbiased: bool) -> Tensor:
    mats = grams(layers, kernel, sigmas)
    estimator = hsic_unbiased if unbiased else hsic_biased
    count = len(mats)
    out = torch.empty(count, count, dtype=torch.float64)
    for a in range(count):
        for b in range(a, count):
            out[a, b] = out[b, a] = estimator(mats[a], mats[b])
    return out


def cka_matrix(layers: Sequence[Tensor], kernel: str, sigmas: Sequence[float] | None, unbiased: bool) -> Tensor:
    h = hsic_matrix(layers, kernel, sigmas, unbiased)
    d = h.diagonal().sqrt()
    return h / (d[:, None] * d[None, :])


def kornblith_sigma(x: Tensor, threshold: float = 1.0) -> float:
    """Kornblith's gram_rbf bandwidth: sqrt(threshold^2 * median of all n^2 squared distances)."""
    values = squared_distances(x).reshape(-1)
    return float(threshold * _numpy_median(values) ** 0.5)


def nonzero_median_sigma(x: Tensor) -> float:
    """The widely copied snippet's bandwidth: sqrt(median of the non-zero squared distances)."""
    values = squared_distances(x).reshape(-1)
    return float(_numpy_median(values[values != 0]) ** 0.5)


def _numpy_median(values: Tensor) -> float:
    ordered = values.sort().values
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else float((ordered[middle - 1] + ordered[middle]) / 2)
