"""Merge rules: how the tensors of a window of consecutive blocks [lo, hi] become one block.

Every rule is applied to every tensor of the block (projections, norms, biases), computed in float32
and cast back to the output dtype:

- keep_high: the top block's tensors.
- keep_low: the bottom block's tensors (plain deletion of lo+1..hi; the reference's `delete` ablation).
- mean: the element-wise mean over the window.
- sum: the element-wise sum (the reference's `average` ablation, which never divides).
- rdsc: theta_lo + sum_{k=lo+1..hi} (theta_k - theta_lo), the formula the SLM and LaCo papers state.
  Its norm grows with the window (about 3.6x for 4 blocks), which usually breaks the model.
- keep_high_norms_low: what the reference code really computes (slm_reference.md section 3): its
  in-place update degenerates to the top block's projection matrices, while the tensors it never
  touches (norms, biases) keep the bottom block's values.

A window is read block by block, so at most two float32 blocks (theta_lo and the running sum) are
held at a time, whatever the window's length.

The merged block also needs per-layer settings (attention type and sliding window, RoPE or not,
anything else the config lists per layer): `settings_block` says which source block's it takes, the
one whose weights dominate, and every place that builds, runs or writes a merged block asks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from slm_fast.errors import CheckpointError, InputError

RULES = ("keep_high", "keep_low", "mean", "sum", "rdsc", "keep_high_norms_low")
# For the averaging rules (mean, sum, rdsc) no block dominates: `low` (the default) takes the bottom
# block's settings, as the merged block sits at its depth and rdsc is anchored on its weights.
AVERAGE_SETTINGS = ("low", "high")

BlockReader = Callable[[int], Mapping[str, Tensor]]


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise InputError(f"unknown merge rule {rule!r}; choose one of: {', '.join(RULES)}")
    return rule


def check_average_settings(average_settings: str) -> str:
    if average_settings not in AVERAGE_SETTINGS:
        raise InputError(f"unknown average settings {average_settings!r}; choose one of: {', '.join(AVERAGE_SETTINGS)}")
    return average_settings


def settings_block(lo: int, hi: int, rule: str, average_settings: str = "low") -> int:
    """The source block whose per-layer settings the window [lo, hi] merged by `rule` runs and is
    written with: hi for keep_high and keep_high_norms_low (the top block's projections), lo for
    keep_low, and for mean / sum / rdsc the bottom or top block as `average_settings` says."""
    check_rule(rule)
    check_average_settings(average_settings)
    if rule in ("keep_high", "keep_high_norms_low"):
        return hi
    if rule == "keep_low":
        return lo
    return lo if average_settings == "low" else hi


def merge_window(
    read_block: BlockReader,
    lo: int,
    hi: int,
    rule: str,
    *,
    is_projection: Callable[[str], bool],
    out_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Merge blocks lo..hi (inclusive) read through `read_block(index) -> {name: tensor}`.

    `is_projection(name)` tells which tensors the reference merges (used by keep_high_norms_low only).
    `out_dtype=None` keeps each tensor's source dtype. A single-block window returns that block.
    """
    check_rule(rule)
    if hi < lo:
        raise InputError(f"window [{lo}, {hi}] is reversed")
    if lo == hi or rule in ("keep_high", "keep_low"):
        source = read_block(hi if rule == "keep_high" else lo)
        return {name: _cast(t, out_dtype) for name, t in source.items()}
    if rule == "keep_high_norms_low":
        low, high = read_block(lo), read_block(hi)
        _check_same_tensors(low, high, lo, hi)
        return {name: _cast(high[name] if is_projection(name) else low[name], out_dtype) for name in low}

    base = read_block(lo)
    total = {name: t.float().clone() for name, t in base.items()}
    theta_lo = {name: t.float() for name, t in base.items()} if rule == "rdsc" else None
    for block in range(lo + 1, hi + 1):
        tensors = read_block(block)
        _check_same_tensors(base, tensors, lo, block)
        for name, acc in total.items():
            if theta_lo is None:
                acc += tensors[name].float()
            else:
                acc += tensors[name].float() - theta_lo[name]
    if rule == "mean":
        for acc in total.values():
            acc /= hi - lo + 1
    # Cast one tensor at a time, releasing its float32 sum: peak stays at one float32 block.
    return {name: total.pop(name).to(out_dtype or base[name].dtype) for name in list(total)}


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None or tensor.dtype == dtype else tensor.float().to(dtype)


def _check_same_tensors(first: Mapping[str, Tensor], other: Mapping[str, Tensor], lo: int, block: int) -> None:
    if first.keys() != other.keys():
        diff = sorted(set(first) ^ set(other))
        raise CheckpointError(f"blocks {lo} and {block} hold different tensors: {diff}")
    for name, tensor in first.items():
        if tensor.shape != other[name].shape:
            raise CheckpointError(
                f"tensor {name!r}: block {lo} has shape {list(tensor.shape)}, "
                f"block {block} has {list(other[name].shape)}"
            )
