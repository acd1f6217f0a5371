"""Data parallelism for the commands whose work is a set of independent items (calibration samples,
perplexity windows, task documents): every rank reads the whole model and takes a contiguous share of
the items, in rank order; the ranks' results are gathered and combined in item order, so the numbers
equal those of one process.

All functions take the command's `Launch` and are no-ops (or trivial) for a single process, so a
command calls them unconditionally. Collectives run on the default process group that
`slm_fast.parallel.launch.join` set up; their small messages are CPU tensors or pickled objects (gloo).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from slm_fast.errors import InputError
from slm_fast.parallel.launch import Launch, communicate
from slm_fast.parallel.team import Team


def shard(count: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `count` items: the first count % world_size ranks take one
    more (a rank gets none when there are fewer items than ranks)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@contextmanager
def together(launch: Launch) -> Iterator[None]:
    """Run the block's input checks on every rank and fail on every rank when any rank's check failed
    (`Team.checks`: the failing rank raises its own error, the others its message naming the rank), so
    that no rank goes on into a collective its peers will never join. Put every check of the input
    here, before the long work."""
    team = Team.current() if launch.distributed else None
    if team is None:
        yield
        return
    with team.checks():
        yield


def gather_in_order(items: Sequence[Any], launch: Launch) -> list[Any]:
    """Every rank's `items` (picklable) concatenated in rank order, on every rank: with `shard`'s
    contiguous shares, the items of all ranks in item order."""
    if not launch.distributed:
        return list(items)
    everyone: list[Any] = [None] * launch.world_size
    communicate(dist.all_gather_object, everyone, list(items))
    return [item for part in everyone for item in part]


def check_same_input(launch: Launch, what: str, tensor: torch.Tensor) -> None:
    """InputError on every rank unless `tensor` (the items every rank built from its own copy of the
    input files) is the same on every rank: hosts with different files would otherwise compute a
    silently wrong result."""
    if not launch.distributed:
        return
    digest = hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    everyone: list[Any] = [None] * launch.world_size
    communicate(dist.all_gather_object, everyone, (tuple(tensor.shape), digest))
    differ = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
    if differ:
        raise InputError(
            f"{what}: rank(s) {differ} built different data from rank 0 ({everyone[differ[0]][0]} vs "
            f"{everyone[0][0]}, or the same shape with other values): every host needs the same files"
        )


def sum_over_ranks(values: dict[str, int], launch: Launch) -> dict[str, int]:
    """Integer counters summed over the ranks (the same dict on every rank)."""
    if not launch.distributed or not values:
        return dict(values)
    totals = torch.tensor(list(values.values()), dtype=torch.int64)
    communicate(dist.all_reduce, totals)
    return dict(zip(values, totals.tolist(), strict=True))


def max_over_ranks(value: int, launch: Launch) -> int:
    if not launch.distributed:
        return value
    top = torch.tensor([value], dtype=torch.int64)
    communicate(dist.all_reduce, top, op=dist.ReduceOp.MAX)
    return int(top)
