"""CUDA C++ backend of the kernel-sums contract (slm_fast/kernels/__init__.py): a thin wrapper of the
optional extension `slm_fast._cuda` built from csrc/ by setup.py where torch has CUDA and nvcc is
found. Inputs are centred here (the contract's centre subtracted in float32, then cast back to the
inputs' dtype, widths zero-padded to a multiple of 16) before the extension sees them. Two paths:

- fused tiles (csrc/cka_tiles.cu, planned in csrc/cka_binding.cpp): the band variant (few cross
  pairs), and all pairs below SLAB_MIN_WIDTH; WMMA 64-token tiles, the same design as the Triton
  backend's band kernel;
- slabs (all pairs from SLAB_MIN_WIDTH on): slm_fast/kernels/slabs.py drives the row slabs and
  column chunks, with the Gram tiles of all layers by one batched cuBLASLt GEMM (bf16/fp16 in, fp32
  out; `_cuda.gram_slab`) and the CUDA epilogue kernel (`_cuda.slab_epilogue`, csrc/cka_slabs.cu).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import (
    ContractInputs,
    KernelSums,
    centred_copy,
    centred_stack,
    check_inputs,
    contract_entry,
    slabs,
    stacked_squared_norms,
)
from slm_fast.kernels.tiled import LOG2_E

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
# All pairs: the (padded) width from which the slab path (cuBLASLt GEMMs + CUDA epilogue) is used
# instead of the fused WMMA tiles: the GEMM's rate decides from where the slab path's four passes over
# each fp32 kernel entry cost less than the GEMM (the reasoning of triton_cka.SLAB_MIN_WIDTH). A first
# estimate: re-tune it on a GPU (bench/bench_gpu_kernels.py).
SLAB_MIN_WIDTH = 2048


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
    all_pairs = variant == "all_pairs" or (variant == "cheaper" and not _prefers_band(len(width), inputs.pairs))
    if variant == "slabs" or (all_pairs and max(width) >= SLAB_MIN_WIDTH):
        return _run_slabs(inputs, dtype, max(width), kernel == "rbf")
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


def _prefers_band(n_layers: int, pairs: list[tuple[int, int]]) -> bool:
    """The extension's rule (csrc/cka_tile_math.h, prefer_band): the band variant while it computes at
    most 1.25 Gram tiles per layer (two per cross pair, one per layer in none)."""
    cross = {(min(a, b), max(a, b)) for a, b in pairs if a != b}
    covered = {a for pair in cross for a in pair}
    gemms = 2 * len(cross) + n_layers - len(covered)
    return 4 * gemms <= 5 * n_layers


def _run_slabs(inputs: ContractInputs, dtype: torch.dtype, width: int, rbf: bool) -> KernelSums:
    """All pairs by the slab path (module docstring)."""
    rows = centred_stack(inputs.rows, inputs.centers, dtype, width)
    cols = rows if inputs.symmetric else centred_stack(inputs.cols, inputs.centers, dtype, width)
    row_norms = col_norms = None
    if rbf:
        row_norms = stacked_squared_norms(rows)
        col_norms = row_norms if inputs.symmetric else stacked_squared_norms(cols)
    tf32 = _fp32_uses_tf32()
    n_layers, m = rows.shape[:2]
    if m == 0 or cols.shape[1] == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=rows.device)
        return KernelSums(zeros(len(inputs.pairs)), zeros(n_layers, m), zeros(n_layers, cols.shape[1]))
    try:
        return slabs.all_pairs_slabs(
            rows,
            cols,
            row_norms,
            col_norms,
            [LOG2_E * g for g in inputs.gammas] if rbf else None,
            inputs.pairs,
            inputs.symmetric,
            slab=slabs.slab_size(n_layers, m, inputs.symmetric, interpreting=False),
            gram_into=lambda stage, x, y: _cuda.gram_slab(x, y, stage, tf32),
            epilogue=_cuda.slab_epilogue,
        )
    except ValueError as exc:  # the extension's input checks (TORCH_CHECK_VALUE)
        raise InputError(str(exc)) from exc


kernel_sums = contract_entry(
    "kernel_sums",
    functools.partial(_run, "cheaper"),
    """The backend contract, by the variant computing fewer Gram tiles (band or all pairs).""",
)


band_kernel_sums = contract_entry(
    "band_kernel_sums",
    functools.partial(_run, "band"),
    """kernel_sums by the band variant: one launch per cross pair, both tiles in shared memory.""",
)


all_pairs_kernel_sums = contract_entry(
    "all_pairs_kernel_sums",
    functools.partial(_run, "all_pairs"),
    """kernel_sums by the all-pairs variant: below SLAB_MIN_WIDTH staged float64 tiles and one batched
    L x L matmul, from it on the slab path.""",
)


slab_kernel_sums = contract_entry(
    "slab_kernel_sums",
    functools.partial(_run, "slabs"),
    """kernel_sums by the slab path whatever the width: batched cuBLASLt Gram GEMMs and the CUDA
    epilogue (block_size is checked, the slab is slabs.slab_size's choice).""",
)
