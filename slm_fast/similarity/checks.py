"""Validation of the similarity engine's inputs: activations, layer pairs and kernel options. Every
error is an InputError naming the layer, token or option at fault."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.errors import InputError

KERNELS = ("linear", "rbf")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")


def min_tokens(unbiased: bool) -> int:
    """Fewest tokens an estimator is defined for: the unbiased one divides by n(n - 3)."""
    return 4 if unbiased else 2


def as_layers(acts: Tensor | Sequence[Tensor], *, what: str = "acts") -> list[Tensor]:
    """A [L, n, d] tensor or a sequence of L [n, d_a] tensors, as a list of [n, d_a] tensors."""
    if isinstance(acts, Tensor):
        if acts.ndim != 3:
            raise InputError(
                f"{what} must be a [L, n, d] tensor or a sequence of [n, d] tensors; got a tensor of shape "
                f"{tuple(acts.shape)}"
            )
        return list(acts.unbind(0))
    layers = list(acts)
    if not layers:
        raise InputError(f"{what} holds no layers")
    for a, x in enumerate(layers):
        if not isinstance(x, Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"{what}: layer {a} must be a 2-D [n, d] tensor, got {shape}")
    return layers


def check_layers(layers: Sequence[Tensor], *, tokens_at_least: int, what: str = "acts") -> list[bool]:
    """Check dtype, device, token count and finiteness; return which layers are constant (every token
    equal), whose HSIC is zero and whose CKA is therefore undefined."""
    first = layers[0]
    for a, x in enumerate(layers):
        if x.dtype not in FLOAT_DTYPES:
            raise InputError(f"{what}: layer {a} has dtype {x.dtype}; use float32, bfloat16, float16 or float64")
        if x.device != first.device:
            raise InputError(f"{what}: layer {a} is on {x.device} but layer 0 is on {first.device}")
        if x.shape[0] != first.shape[0]:
            raise InputError(
                f"{what}: layer {a} holds {x.shape[0]} tokens but layer 0 holds {first.shape[0]}; every layer "
                "must hold the same tokens"
            )
        if x.shape[1] < 1:
            raise InputError(f"{what}: layer {a} has width 0")
        check_finite(x, f"{what}: layer {a}")
    if first.shape[0] < tokens_at_least:
        raise InputError(
            f"{what}: {first.shape[0]} tokens, but the estimator needs at least {tokens_at_least}"
            + (" (unbiased HSIC divides by n(n-3))" if tokens_at_least == 4 else "")
        )
    return [torch.equal(x, x[:1].expand_as(x)) for x in layers]


def check_finite(x: Tensor, what: str) -> None:
    """InputError naming the first token with a NaN or Inf. The test is the minimum and maximum (one
    pass, no n x d mask; NaN propagates into both): a mask is built only to locate a bad token."""
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    finite = torch.isfinite(x)
    token = int((~finite).reshape(x.shape[0], -1).any(1).nonzero()[0, 0]) if x.ndim else 0
    raise InputError(f"{what} holds NaN or Inf values (first at token {token})")


def normalize_pairs(pairs: Sequence[Sequence[int]] | Tensor | None, num_layers: int) -> Tensor:
    """Requested layer pairs as a sorted, deduplicated int64 [P, 2] tensor with a <= b (all pairs when
    `pairs` is None)."""
    if pairs is None:
        return torch.triu_indices(num_layers, num_layers).T.contiguous()
    try:
        table = torch.as_tensor(pairs, dtype=torch.int64).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"pairs must be a sequence of (a, b) layer index pairs: {exc}") from exc
    if table.numel() == 0:
        raise InputError("pairs is empty; pass None for all pairs")
    if table.ndim != 2 or table.shape[1] != 2:
        raise InputError(f"pairs must have shape [P, 2], got {tuple(table.shape)}")
    bad = ((table < 0) | (table >= num_layers)).any(1).nonzero()
    if len(bad):
        k = int(bad[0, 0])
        raise InputError(f"pairs[{k}] = {tuple(table[k].tolist())} names a layer outside [0, {num_layers})")
    ordered = torch.stack([table.min(1).values, table.max(1).values], 1)
    return torch.unique(ordered, dim=0)


def with_diagonal(pairs: Tensor) -> Tensor:
    """`pairs` plus (a, a) for every layer a they name: CKA normalises by HSIC(a, a)."""
    layers = torch.unique(pairs)
    return torch.unique(torch.cat([pairs, torch.stack([layers, layers], 1)]), dim=0)


def squared_norms(layers: Sequence[Tensor], centers: Sequence[Tensor], chunk: int = 4096) -> Tensor:
    """[L, n] float64 |x_ai - c_a|^2: the diagonal of the linear kernel of the centred layers (the
    kernel the backends reduce), which unbiased HSIC removes."""
    n = layers[0].shape[0]
    out = torch.empty(len(layers), n, dtype=torch.float64, device=layers[0].device)
    for a, (x, c) in enumerate(zip(layers, centers, strict=True)):
        for s in range(0, n, chunk):
            centred = x[s : s + chunk].to(c.dtype) - c
            out[a, s : s + chunk] = torch.linalg.vector_norm(centred, dim=1, dtype=torch.float64).square_()
    return out
