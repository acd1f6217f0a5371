"""CUDA C++ backend of the kernel-sums contract (slm_fast/kernels/__init__.py): a thin wrapper of the
optional extension `slm_fast._cuda` built from csrc/ by setup.py where torch has CUDA and nvcc is
found. The kernels, the launch planning and the float64 reductions live in csrc/ (see
csrc/cka_binding.cpp); they follow the same design as the Triton backend (triton_cka.py) with a
fixed 64-token tile. Inputs are centred here (the contract's centre subtracted in float32, then cast
back to the inputs' dtype, widths zero-padded to a multiple of 16) before the extension sees them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import KernelSums, centred_copy, check_inputs

try:
    from slm_fast import _cuda
except ImportError as exc:
    _cuda = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

# The extension's token tile; the only block_size it takes.
BLOCK = 64 if _cuda is None else _cuda.BLOCK
_VARIANTS = {"cheaper": 0, "band": 1, "all_pairs": 2}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Centred copies are zero-padded to this width multiple, so that the extension's 16-byte loads apply.
WIDTH_ALIGN = 16


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the extension can run on `device`, else why not."""
    if _cuda is None:
        return (
            f"the CUDA extension slm_fast._cuda is not built ({_IMPORT_ERROR}); it is built by "
            "`pip install --no-build-isolation -e .` where torch has CUDA and nvcc is found"
        )
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "its bf16 tensor-core tiles need compute capability 8.0 (Ampere) or newer"
    return None


def _fp32_uses_tf32() -> bool:
    """fp32 inputs take tf32 tensor cores when torch's matmul setting allows it (ieee by default)."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting is None:  # torch < 2.9
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return setting == "tf32"


def _run(
    variant: str,
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None,
    block_size: int | None,
) -> KernelSums:
    if kernel not in ("linear", "rbf"):
        raise InputError(f"unknown kernel {kernel!r}; choose linear or rbf")
    if block_size not in (None, BLOCK):
        raise InputError(f"the cuda backend's token tile is fixed at {BLOCK}, got block_size={block_size}")
    if not rows:
        raise InputError("kernel_sums needs at least one layer")
    device = rows[0].device
    reason = unavailable_reason(device)
    if reason is not None:
        raise InputError(f"backend 'cuda' cannot run on {device}: {reason}")
    inputs = check_inputs(rows, cols, kernel, gammas, pairs, centers, dtypes=SUPPORTED_DTYPES)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs.rows + inputs.cols))
    width = [-(-x.shape[1] // WIDTH_ALIGN) * WIDTH_ALIGN for x in inputs.rows]
    rows = [centred_copy(x, c, dtype, w) for x, c, w in zip(inputs.rows, inputs.centers, width, strict=True)]
    if cols is not None:
        cols = [centred_copy(x, c, dtype, w) for x, c, w in zip(inputs.cols, inputs.centers, width, strict=True)]
    try:
        frob, row_sums, col_sums = _cuda.kernel_sums(
            rows,
            [] if cols is None else cols,
            kernel == "rbf",
            [] if gammas is None else [float(g) for g in gammas],
            pairs,
            _fp32_uses_tf32(),
            _VARIANTS[variant],
        )
    except ValueError as exc:  # the extension's input checks (TORCH_CHECK_VALUE)
        raise InputError(str(exc)) from exc
    return KernelSums(frob, row_sums, col_sums)


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
    """The backend contract, by the variant computing fewer Gram tiles (band or all pairs)."""
    return _run("cheaper", rows, cols, kernel, gammas, pairs, centers, block_size)


def band_kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
    block_size: int | None = None,
) -> KernelSums:
    """kernel_sums by the band variant: one launch per cross pair, both tiles in shared memory."""
    return _run("band", rows, cols, kernel, gammas, pairs, centers, block_size)


def all_pairs_kernel_sums(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None,
    *,
    kernel: str,
    gammas: Sequence[float] | None,
    pairs: Tensor,
    centers: Sequence[Tensor] | None = None,
    block_size: int | None = None,
) -> KernelSums:
    """kernel_sums by the all-pairs variant: staged float64 tiles, one batched L x L matmul."""
    return _run("all_pairs", rows, cols, kernel, gammas, pairs, centers, block_size)
