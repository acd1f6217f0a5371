"""Merge windows: inclusive ranges [lo, hi] of source block indices, each collapsing to one block at
its lowest index. A list of windows over L blocks defines the output's blocks in order."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from slm_fast.errors import WindowError

Window = tuple[int, int]


def parse_windows(text: str) -> list[Window]:
    """'20-23,10-12' -> [(20, 23), (10, 12)]; a bare '7' is the one-block window (7, 7)."""
    windows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError as exc:
            raise WindowError(f"window {part!r} is not of the form LO-HI (inclusive block indices)") from exc
        windows.append((lo, hi))
    if not windows:
        raise WindowError(f"no windows in {text!r}")
    return windows


def validate_windows(windows: Iterable[Window], num_blocks: int) -> list[Window]:
    """Sorted windows after checking each is in range, not reversed, and disjoint from the others."""
    ordered = sorted(windows)
    for lo, hi in ordered:
        if hi < lo:
            raise WindowError(f"window {lo}-{hi} is reversed (write it {hi}-{lo})")
        if lo < 0 or hi >= num_blocks:
            raise WindowError(f"window {lo}-{hi} is out of range: blocks are 0..{num_blocks - 1}")
    for (lo_a, hi_a), (lo_b, hi_b) in itertools.pairwise(ordered):
        if lo_b <= hi_a:
            raise WindowError(f"windows {lo_a}-{hi_a} and {lo_b}-{hi_b} overlap")
    return ordered


def output_blocks(windows: Iterable[Window], num_blocks: int, dropped: Iterable[int] = ()) -> list[Window]:
    """The source window of every output block: merged windows, and untouched blocks as (i, i);
    blocks in `dropped` (outside every window) are left out."""
    merged = {lo: hi for lo, hi in validate_windows(windows, num_blocks)}
    dropped = set(dropped)
    for block in sorted(dropped):
        if not 0 <= block < num_blocks:
            raise WindowError(f"dropped block {block} is out of range: blocks are 0..{num_blocks - 1}")
        if any(lo <= block <= hi for lo, hi in merged.items()):
            raise WindowError(f"dropped block {block} lies inside a merge window")
    plan, block = [], 0
    while block < num_blocks:
        hi = merged.get(block, block)
        if block not in dropped:
            plan.append((block, hi))
        block = hi + 1
    if not plan:
        raise WindowError("every block would be dropped")
    return plan


def format_windows(windows: Iterable[Window]) -> str:
    return ",".join(f"{lo}-{hi}" for lo, hi in windows) or "(none)"
