"""Similarity kernels: every backend computes the same kernel sums; the estimators live in similarity/.

The contract (one function per backend module, `kernel_sums`): given the activations of L layers on
a block of m "row" tokens and a block of k "column" tokens, and one centre c_a per layer, return the
reductions of the L kernel matrices K_a[i, j] = k_a(rows_a[i] - c_a, cols_a[j] - c_a) that every
HSIC/CKA estimator needs, without materialising the full n x n matrices:

    frob[p]        = sum_ij K_a[i, j] * K_b[i, j]      for each requested pair p = (a, b)
    row_sums[a, i] = sum_j K_a[i, j]
    col_sums[a, j] = sum_i K_a[i, j]

Centring is part of the contract because precision depends on it: real residual streams carry shared
offsets and a few "massive" channels, and |x|^2 + |y|^2 - 2 x.y of uncentred rows loses every digit of
the distances in float32. Every backend subtracts c_a in float32 (float64 for float64 inputs) before
any product and before any cast to bf16/fp16, and computes RBF distances from the centred rows. HSIC
and CKA are invariant to a shared translation of a layer (RBF: exactly; linear: through the centring
H K H), so any c_a near the layer's token mean gives the same estimates; `layer_centers` is the default.

`cols=None` means the symmetric case cols = rows: backends then visit only tiles J >= I (off-diagonal
tiles count twice) and col_sums equals row_sums. Kernels: "linear" k(x, y) = x.y and "rbf"
k(x, y) = exp(-gamma_a * |x - y|^2) with one gamma (= 1 / (2 sigma^2)) per layer. Inputs may be
fp32, bf16 or fp16 and may differ in width d per layer; all three outputs are float64 on the
inputs' device. Diagonal terms are included: estimators that need a zero diagonal subtract them.

Each backend module exposes:
    kernel_sums(rows, cols, *, kernel, gammas, pairs, centers=None, block_size=None) -> KernelSums
        rows: sequence of L tensors [m, d_a]; cols: sequence of L tensors [k, d_a] or None;
        kernel: "linear" | "rbf"; gammas: L floats for "rbf", None for "linear";
        pairs: int64 tensor [P, 2] of layer indices (a, b); centers: L tensors [d_a] (None: the token
        mean of rows and cols, `layer_centers`); block_size: token tile, None = backend's choice.
    unavailable_reason(device) -> str | None
        None when the backend can run on `device`, else a sentence saying why not.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from slm_fast.errors import InputError


class KernelSums(NamedTuple):
    """Reductions of the L kernel matrices over one (rows x cols) block; see the module docstring."""

    frob: Tensor  # [P] float64
    row_sums: Tensor  # [L, m] float64
    col_sums: Tensor  # [L, k] float64


class ContractInputs(NamedTuple):
    """`kernel_sums` arguments after the checks every backend shares."""

    rows: list[Tensor]
    cols: list[Tensor]  # the same list as rows when symmetric
    symmetric: bool
    gammas: list[float] | None  # None for the linear kernel
    pairs: list[tuple[int, int]]
    centers: list[Tensor]  # [d_a] per layer, float32 (float64 when an input is float64), on the inputs' device


def contract_entry(name: str, run: Callable[..., KernelSums], doc: str) -> Callable[..., KernelSums]:
    """A backend's public entry point `name`: the contract's signature, `kernel_sums(rows, cols, *,
    kernel, gammas, pairs, centers=None, block_size=None)`, calling `run` with those seven arguments in
    that order (a backend's variants differ only in `run`)."""

    def entry(
        rows: Sequence[Tensor],
        cols: Sequence[Tensor] | None,
        *,
        kernel: str,
        gammas: Sequence[float] | None,
        pairs: Tensor,
        centers: Sequence[Tensor] | None = None,
        block_size: int | None = None,
    ) -> KernelSums:
        return run(rows, cols, kernel, gammas, pairs, centers, block_size)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    return entry


def check_inputs(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64),
) -> ContractInputs:
    """Validate `kernel_sums` arguments against the contract; InputError names what is wrong."""
    if kernel not in ("linear", "rbf"):
        raise InputError(f"unknown kernel {kernel!r}; choose linear or rbf")
    rows = list(rows)
    if not rows:
        raise InputError("kernel_sums needs at least one layer")
    symmetric = cols is None
    cols = rows if cols is None else list(cols)
    if len(cols) != len(rows):
        raise InputError(f"rows hold {len(rows)} layers but cols hold {len(cols)}")
    for name, side in (("rows", rows), ("cols", cols)):
        for a, x in enumerate(side):
            if x.ndim != 2 or x.shape[0] != side[0].shape[0] or x.shape[1] != rows[a].shape[1]:
                raise InputError(
                    f"{name}[{a}] has shape {tuple(x.shape)}; expected [{side[0].shape[0]}, {rows[a].shape[1]}]"
                )
            if x.dtype not in dtypes:
                allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
                raise InputError(f"{name}[{a}] is {x.dtype}; this backend takes {allowed}")
            if x.device != rows[0].device:
                raise InputError(f"{name}[{a}] is on {x.device}, not on {rows[0].device} with the others")
    if kernel == "rbf":
        if gammas is None or len(gammas) != len(rows):
            raise InputError(f"the rbf kernel needs one gamma per layer ({len(rows)}), got {gammas!r}")
        gammas = [float(g) for g in gammas]
        if not all(math.isfinite(g) and g > 0 for g in gammas):
            raise InputError(f"every gamma must be positive and finite, got {gammas}")
    elif gammas is not None:
        raise InputError("the linear kernel takes no gammas")
    pairs = torch.as_tensor(pairs)
    if pairs.dtype.is_floating_point or (pairs.numel() and (pairs.dim() != 2 or pairs.shape[1] != 2)):
        raise InputError(f"pairs must be an integer tensor [P, 2], got {tuple(pairs.shape)} {pairs.dtype}")
    pair_list = [(int(a), int(b)) for a, b in pairs.reshape(-1, 2).tolist()]
    if any(not (0 <= a < len(rows) and 0 <= b < len(rows)) for a, b in pair_list):
        raise InputError(f"pairs must index layers 0..{len(rows) - 1}, got {pair_list}")
    dtype = center_dtype([*rows, *cols])
    if centers is None:
        centers = layer_centers(rows, None if symmetric else cols)
    else:
        centers = list(centers)
        if len(centers) != len(rows):
            raise InputError(f"centers hold {len(centers)} vectors for {len(rows)} layers")
        for a, c in enumerate(centers):
            if c.shape != (rows[a].shape[1],) or not c.is_floating_point():
                raise InputError(f"centers[{a}] is {tuple(c.shape)} {c.dtype}; expected a float [{rows[a].shape[1]}]")
    centers = [c.to(rows[0].device, dtype) for c in centers]
    return ContractInputs(rows, cols, symmetric, gammas, pair_list, centers)


def center_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32: the precision in which layers are centred."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def layer_centers(rows: Sequence[Tensor], cols: Sequence[Tensor] | None = None, chunk: int = 4096) -> list[Tensor]:
    """Token mean of each layer over rows (and cols), returned in `center_dtype`: chunk sums in the
    chunk's precision (float32 at least; torch sums pairwise), accumulated in float64. Any centre near
    the mean serves (see the module docstring), and a float64 sum of float32 data would cost far more."""
    sides = [list(rows)] if cols is None else [list(rows), list(cols)]
    dtype = center_dtype([t for side in sides for t in side])
    centers = []
    for a in range(len(rows)):
        total = torch.zeros(rows[a].shape[1], dtype=torch.float64, device=rows[a].device)
        count = 0
        for side in sides:
            x = side[a]
            for s in range(0, x.shape[0], chunk):
                part = x[s : s + chunk]
                total += part.sum(0, dtype=torch.promote_types(part.dtype, torch.float32)).double()
            count += x.shape[0]
        centers.append((total / max(count, 1)).to(dtype))
    return centers


def centred_copy(
    x: Tensor,
    center: Tensor,
    dtype: torch.dtype,
    width: int | None = None,
    chunk: int = 4096,
    out: Tensor | None = None,
) -> Tensor:
    """(x - center) computed in center's precision, then cast to `dtype`, as a new [n, width] tensor
    (zero columns pad d up to `width`), or written into `out` [n, width] of that dtype; a chunk of
    rows at a time, so the float32 temporary stays small."""
    n, d = x.shape
    if out is None:
        out = torch.zeros(n, width or d, dtype=dtype, device=x.device)
    else:
        out[:, d:] = 0
    for s in range(0, n, chunk):
        out[s : s + chunk, :d] = (x[s : s + chunk].to(center.dtype) - center).to(dtype)
    return out


def centred_stack(layers: Sequence[Tensor], centers: Sequence[Tensor], dtype: torch.dtype, width: int) -> Tensor:
    """[L, n, width]: layer a's tokens minus centers[a] (see `centred_copy`), zero-padded: one tensor
    for backends that take all layers in one batched GEMM or one launch (the layers of a model share a
    width; narrower ones are padded to the widest)."""
    out = torch.empty(len(layers), layers[0].shape[0], width, dtype=dtype, device=layers[0].device)
    for a, (x, c) in enumerate(zip(layers, centers, strict=True)):
        centred_copy(x, c, dtype, out=out[a])
    return out


def stacked_squared_norms(x: Tensor, chunk_bytes: int = 64 << 20) -> Tensor:
    """|x_i|^2 in fp32 of stacked layers [L, n, D] -> [L, n], upcasting a bounded chunk of rows at a time."""
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    step = max(1, chunk_bytes // (4 * max(1, x.shape[2])))
    for a in range(x.shape[0]):
        for i in range(0, x.shape[1], step):
            out[a, i : i + step] = x[a, i : i + step].float().square().sum(1)
    return out


BACKEND_MODULES = {
    "tiled": "slm_fast.kernels.tiled",
    "triton": "slm_fast.kernels.triton_cka",
    "cuda": "slm_fast.kernels.cuda",
}
# Preference order of "auto" on a CUDA device; on the CPU "auto" is always the tiled torch backend
# (Triton runs on the CPU only through its interpreter, which is for tests). The Triton and CUDA
# backends are left out of "auto" until their GPU tests at real sizes (tests marked `gpu`) have passed
# on a GPU, which no run has done yet: name backend="triton" or "cuda" to use them.
AUTO_ORDER_CUDA = ("tiled",)


def load_backend(name: str, device: torch.device | str) -> ModuleType:
    """Return the backend module `name` ("auto", "tiled", "triton", "cuda") able to run on `device`.

    An explicitly named backend that cannot run raises InputError with the reason; "auto" picks the
    first available one in AUTO_ORDER_CUDA on CUDA devices and "tiled" elsewhere.
    """
    device = torch.device(device)
    if name == "auto":
        order = AUTO_ORDER_CUDA if device.type == "cuda" else ("tiled",)
        for candidate in order:
            module = importlib.import_module(BACKEND_MODULES[candidate])
            if module.unavailable_reason(device) is None:
                return module
        raise InputError(f"no similarity backend can run on {device}")
    if name not in BACKEND_MODULES:
        raise InputError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKEND_MODULES)}")
    module = importlib.import_module(BACKEND_MODULES[name])
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise InputError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
