"""Public similarity API: exact linear and RBF CKA/HSIC between layers without n x n matrices, a
streaming accumulator, and the cosine-based scores of the depth-pruning literature.

Activations `acts`: a [L, n, d] tensor or a sequence of L [n, d_a] tensors (the same n tokens in every
layer; widths may differ), float32, bfloat16, float16 or float64. Every layer is centred on its token
mean in float32 (float64 for float64 input) before any product, so shared offsets and massive
activations cost no precision; kernel sums are float32 products (float64 for float64 input) reduced in
float64; results are float64.

Estimators (similarity/estimators.py): biased HSIC = tr(K H L H) / (n-1)^2, or unbiased (Song et al.
2012, = Szekely-Rizzo U-centering; needs n >= 4). CKA(a, b) = HSIC(a, b) / sqrt(HSIC(a, a) HSIC(b, b)).
Kernels: linear k(x, y) = x.y; rbf k(x, y) = exp(-|x - y|^2 / (2 sigma_a^2)) with sigma per layer
(similarity/sigma.py: given, or the median heuristic; RBF CKA tends to linear CKA as sigma -> infinity).

Returned [L, L] matrices are float64 on the CPU. NaN marks pairs that were not requested, and every
entry of a layer whose self-HSIC is zero (constant activations; a RuntimeWarning names it). The diagonal
is 1 for every other layer named by a requested pair. Bad input (NaN/Inf, mismatched token counts,
n < 4 with unbiased=True, bad options) raises slm_fast.errors.InputError naming the layer or option.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import layer_centers, load_backend
from slm_fast.similarity import distributed
from slm_fast.similarity.checks import (
    as_layers,
    check_finite,
    check_kernel,
    check_layers,
    min_tokens,
    normalize_pairs,
    squared_norms,
    with_diagonal,
)
from slm_fast.similarity.estimators import similarity_matrices, stats_from_row_sums
from slm_fast.similarity.sigma import (
    DEFAULT_MEDIAN_PAIRS,
    SigmaSpec,
    check_sigma_spec,
    gammas_from_sigmas,
    median_heuristic_sigmas,
)
from slm_fast.similarity.streaming import StreamingCKA

__all__ = [
    "StreamingCKA",
    "angular_distance",
    "block_influence",
    "cka_matrix",
    "cosine",
    "hsic",
    "resolve_sigmas",
]

PairSpec = Sequence[Sequence[int]] | Tensor | None


def cka_matrix(
    acts: Tensor | Sequence[Tensor],
    kernel: str = "linear",
    sigma: SigmaSpec = None,
    unbiased: bool = False,
    backend: str = "auto",
    pairs: PairSpec = None,
    *,
    sigma_scale: float = 1.0,
    median_diagonal: bool = False,
    median_pairs: int = DEFAULT_MEDIAN_PAIRS,
    seed: int = 0,
    block_size: int | None = None,
    process_group: object | None = None,
) -> Tensor:
    """[L, L] float64 CKA between the layers of `acts`; see the module docstring.

    kernel: "linear" or "rbf". sigma (rbf only): None for the median heuristic (times sigma_scale, over
    `median_pairs` token pairs seeded by `seed`; median_diagonal=True counts the zero i == j pairs as
    Kornblith's reference does), one float, or one float per layer. unbiased: Song et al.'s estimator.
    backend: "auto", "tiled", "triton" or "cuda". pairs: (a, b) layer pairs to compute (others are NaN;
    None = all). block_size: token tile of the backend (None = its choice). process_group: a
    torch.distributed group (or dist.group.WORLD) whose ranks each pass their own tokens of the same
    layers; every rank gets the CKA of all ranks' tokens together, equal to the one-process result on the
    shards concatenated in rank order (similarity/distributed.py). A collective: call it on every rank.
    """
    return _matrices(
        acts,
        kernel,
        sigma,
        unbiased,
        backend,
        pairs,
        sigma_scale,
        median_diagonal,
        median_pairs,
        seed,
        block_size,
        process_group,
    )[0]


def hsic(
    acts: Tensor | Sequence[Tensor],
    kernel: str = "linear",
    sigma: SigmaSpec = None,
    unbiased: bool = False,
    backend: str = "auto",
    pairs: PairSpec = None,
    *,
    sigma_scale: float = 1.0,
    median_diagonal: bool = False,
    median_pairs: int = DEFAULT_MEDIAN_PAIRS,
    seed: int = 0,
    block_size: int | None = None,
    process_group: object | None = None,
) -> Tensor:
    """[L, L] float64 HSIC estimates between the layers of `acts` (the raw estimator behind cka_matrix;
    same arguments). Entries of pairs not requested are NaN; the diagonal holds HSIC(a, a) for every
    layer named by a pair."""
    return _matrices(
        acts,
        kernel,
        sigma,
        unbiased,
        backend,
        pairs,
        sigma_scale,
        median_diagonal,
        median_pairs,
        seed,
        block_size,
        process_group,
    )[1]


def resolve_sigmas(
    acts: Tensor | Sequence[Tensor],
    sigma: SigmaSpec = None,
    *,
    sigma_scale: float = 1.0,
    median_diagonal: bool = False,
    median_pairs: int = DEFAULT_MEDIAN_PAIRS,
    seed: int = 0,
) -> list[float]:
    """The per-layer RBF sigmas that cka_matrix would use for these arguments."""
    layers = as_layers(acts)
    check_layers(layers, tokens_at_least=2)
    explicit = check_sigma_spec(sigma, sigma_scale, len(layers), "rbf")
    return explicit or median_heuristic_sigmas(
        layers, sigma_scale=sigma_scale, include_diagonal=median_diagonal, max_pairs=median_pairs, seed=seed
    )


def _matrices(
    acts: Tensor | Sequence[Tensor],
    kernel: str,
    sigma: SigmaSpec,
    unbiased: bool,
    backend: str,
    pairs: PairSpec,
    sigma_scale: float,
    median_diagonal: bool,
    median_pairs: int,
    seed: int,
    block_size: int | None,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    if process_group is not None:
        return distributed.matrices(
            acts,
            process_group,
            kernel=kernel,
            sigma=sigma,
            unbiased=unbiased,
            backend=backend,
            pairs=pairs,
            sigma_scale=sigma_scale,
            median_diagonal=median_diagonal,
            median_pairs=median_pairs,
            seed=seed,
            block_size=block_size,
        )
    check_kernel(kernel)
    layers = as_layers(acts)
    constant = check_layers(layers, tokens_at_least=min_tokens(unbiased))
    explicit_sigmas = check_sigma_spec(sigma, sigma_scale, len(layers), kernel)
    if block_size is not None and block_size < 1:
        raise InputError(f"block_size must be a positive token count, got {block_size}")
    stat_pairs = with_diagonal(normalize_pairs(pairs, len(layers)))
    module = load_backend(backend, layers[0].device)
    gammas = None
    if kernel == "rbf":
        sigmas = explicit_sigmas or median_heuristic_sigmas(
            layers, sigma_scale=sigma_scale, include_diagonal=median_diagonal, max_pairs=median_pairs, seed=seed
        )
        gammas = gammas_from_sigmas(sigmas)
    centers = layer_centers(layers)
    sums = module.kernel_sums(
        layers, None, kernel=kernel, gammas=gammas, pairs=stat_pairs, centers=centers, block_size=block_size
    )
    diagonal = squared_norms(layers, centers) if kernel == "linear" else None
    stats = stats_from_row_sums(layers[0].shape[0], stat_pairs, sums.frob, sums.row_sums, diagonal)
    return similarity_matrices(len(layers), stats, unbiased, constant)


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine similarity of x and y flattened into single vectors, in float64: the reference SLM
    criterion (final-norm hidden states of the original and the candidate model). NaN with a warning
    when either vector is zero."""
    if x.shape != y.shape:
        raise InputError(f"cosine needs tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_finite(x.reshape(1, -1), "cosine: x")
    check_finite(y.reshape(1, -1), "cosine: y")
    a, b = x.reshape(-1).double(), y.reshape(-1).double()
    norms = float(a.norm() * b.norm())
    if norms == 0:
        warnings.warn("cosine of a zero vector is undefined: returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return float(a @ b) / norms


def _token_cosines(x: Tensor, y: Tensor, what: str) -> Tensor:
    """float64 cosine between x[..., t, :] and y[..., t, :] for every leading index and token."""
    if x.shape != y.shape or x.ndim < 2:
        raise InputError(
            f"{what} needs two [..., tokens, d] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    check_finite(x.reshape(-1, x.shape[-1]), f"{what}: first input")
    check_finite(y.reshape(-1, y.shape[-1]), f"{what}: second input")
    a, b = x.double(), y.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    if bool((norms == 0).any()):
        warnings.warn(f"{what}: some tokens are zero vectors; their cosine is NaN", RuntimeWarning, stacklevel=3)
    return (a * b).sum(-1) / norms


def angular_distance(x: Tensor, y: Tensor, token: int | None = -1) -> Tensor:
    """Gromov et al.'s angular distance arccos(cos(x_t, y_t)) / pi in [0, 1], float64.

    x, y: [..., tokens, d] hidden states at the two depths compared. token: the position scored (the
    paper uses the last token, -1), giving a [...] tensor; None scores every token, giving [..., tokens].
    Average over samples yourself (the paper averages over its calibration set).
    """
    cosines = _token_cosines(x, y, "angular_distance").clamp(-1.0, 1.0)
    if token is not None:
        cosines = cosines[..., token]
    return torch.arccos(cosines) / math.pi


def block_influence(x_in: Tensor, x_out: Tensor, reduction: str = "mean") -> Tensor:
    """ShortGPT block influence BI = 1 - cos(x_in_t, x_out_t) per token, float64.

    x_in, x_out: [..., tokens, d] hidden states entering and leaving a block. reduction: "mean" over all
    tokens (the paper's expectation), "sum" (ShortGPT's code sums over the tokens it sees), or "none"
    for the [..., tokens] per-token values.
    """
    values = 1.0 - _token_cosines(x_in, x_out, "block_influence")
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise InputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
