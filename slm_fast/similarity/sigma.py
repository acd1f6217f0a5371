"""Bandwidth of the RBF kernel k(x, y) = exp(-|x - y|^2 / (2 sigma^2)), i.e. gamma = 1 / (2 sigma^2).

sigma is given (one float for every layer, or one per layer) or chosen by the median heuristic:
sigma_a = sigma_scale * sqrt(median over token pairs of |x_ai - x_aj|^2), Kornblith et al.'s `gram_rbf`
with threshold = sigma_scale (their demo uses 0.5).

Which pairs count:
- include_diagonal=True: the n^2 ordered pairs, zero diagonal included, as Kornblith's reference takes
  np.median over the whole n x n matrix;
- include_diagonal=False (default): the pairs i != j, as the widely copied snippet does (it takes the
  median of the non-zero entries, which differs only where distinct tokens coincide).
The median is exact when n(n-1)/2 <= max_pairs (every pair i < j, each counted twice plus n zeros when
the diagonal counts). Otherwise it is taken over max_pairs pairs drawn by a torch.Generator seeded with
`seed`: i and j independent and uniform (diagonal counted, so i == j has probability 1/n as in the full
matrix) or j uniform over j != i. Distances are float64; the median of an even count is the mean of the
two middle values (numpy's convention). The same pairs serve every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from slm_fast.errors import InputError

DEFAULT_MEDIAN_PAIRS = 65536
_DISTANCE_CHUNK = 2048  # pairs per float64 distance batch (bounds the temporary to 2048 x d doubles)

SigmaSpec = float | Sequence[float] | Tensor | None


class PairSample(NamedTuple):
    """Token pairs of the median heuristic. `exact`: every pair i < j of n tokens."""

    i: Tensor
    j: Tensor
    exact: bool


def sample_pairs(n: int, *, include_diagonal: bool, max_pairs: int, seed: int) -> PairSample:
    if n < 2:
        raise InputError(f"the median heuristic needs at least 2 tokens, got {n}")
    if max_pairs < 1:
        raise InputError(f"median_pairs must be >= 1, got {max_pairs}")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return PairSample(i, j, exact=True)
    generator = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (max_pairs,), generator=generator)
    if include_diagonal:
        j = torch.randint(n, (max_pairs,), generator=generator)
    else:
        j = torch.randint(n - 1, (max_pairs,), generator=generator)
        j = j + (j >= i).long()
    return PairSample(i, j, exact=False)


def median_squared_distance(x: Tensor, sample: PairSample, *, include_diagonal: bool) -> float:
    """Median of |x_i - x_j|^2 (float64) over the pairs of `sample`; see the module docstring."""
    device_i, device_j = sample.i.to(x.device), sample.j.to(x.device)
    values = torch.empty(len(device_i), dtype=torch.float64, device=x.device)
    for s in range(0, len(device_i), _DISTANCE_CHUNK):
        e = s + _DISTANCE_CHUNK
        diff = x[device_i[s:e]].double() - x[device_j[s:e]].double()
        values[s:e] = diff.square().sum(1)
    if sample.exact and include_diagonal:
        n = x.shape[0]
        values = torch.cat([values, values, values.new_zeros(n)])
    return _median(values)


def _median(values: Tensor) -> float:
    ordered = values.sort().values
    count = len(ordered)
    middle = count // 2
    if count % 2:
        return float(ordered[middle])
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def median_heuristic_sigmas(
    layers: Sequence[Tensor],
    *,
    sigma_scale: float = 1.0,
    include_diagonal: bool = False,
    max_pairs: int = DEFAULT_MEDIAN_PAIRS,
    seed: int = 0,
) -> list[float]:
    """sigma_scale * sqrt(median squared distance) for each layer of `layers` ([n, d_a] tensors).

    Raises InputError when a layer's median is 0 (constant or mostly repeated activations): no bandwidth
    can be read from such data, so sigma must be given explicitly.
    """
    sample = sample_pairs(layers[0].shape[0], include_diagonal=include_diagonal, max_pairs=max_pairs, seed=seed)
    sigmas = []
    for a, x in enumerate(layers):
        median = median_squared_distance(x, sample, include_diagonal=include_diagonal)
        if not median > 0:
            raise InputError(
                f"layer {a}: the median squared distance between tokens is {median} (constant or mostly "
                "repeated activations), so the median heuristic cannot choose sigma; pass sigma explicitly"
            )
        sigmas.append(sigma_scale * math.sqrt(median))
    return sigmas


def check_sigma_spec(sigma: SigmaSpec, sigma_scale: float, num_layers: int, kernel: str) -> list[float] | None:
    """Validate the sigma options; return the explicit per-layer sigmas, or None for the median heuristic."""
    if not (isinstance(sigma_scale, int | float) and math.isfinite(sigma_scale) and sigma_scale > 0):
        raise InputError(f"sigma_scale must be a positive finite number, got {sigma_scale!r}")
    if kernel != "rbf":
        if sigma is not None or sigma_scale != 1.0:
            raise InputError(f"sigma and sigma_scale apply to kernel='rbf' only (kernel={kernel!r})")
        return None
    if sigma is None:
        return None
    if sigma_scale != 1.0:
        raise InputError("sigma_scale multiplies the median heuristic; with an explicit sigma leave it at 1.0")
    if isinstance(sigma, Tensor):
        values = [float(s) for s in sigma.reshape(-1).tolist()]
    elif isinstance(sigma, int | float):
        values = [float(sigma)] * num_layers
    else:
        values = [float(s) for s in sigma]
    if len(values) != num_layers:
        raise InputError(f"sigma holds {len(values)} values for {num_layers} layers; give one float or one per layer")
    for a, value in enumerate(values):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"sigma[{a}] = {value} is not a positive finite number")
    return values


def gammas_from_sigmas(sigmas: Sequence[float]) -> list[float]:
    """gamma = 1 / (2 sigma^2), the form the kernel backends take."""
    return [1.0 / (2.0 * s * s) for s in sigmas]
