"""A pipeline over blocks: which rank holds which blocks, and the hidden states sent between them.

Each rank owns a contiguous slice of the source blocks (`Slices`: no more blocks than its memory
keeps resident, and within that an even share of the search's work, at least one block each): it
runs the blocks of its slice and keeps the calibration's boundary states that enter them (boundary b
is the input of block b; the last rank also keeps boundary L, the last block's output). Rank 0 embeds
the tokens; the last rank applies the final norm and the head.

`Link` carries hidden states between ranks with point-to-point messages. Sends are non-blocking
(`isend`: the sender goes on with its next chunk while the message travels), and every message of a
pass flows from a lower rank to a higher one or stays put, so no rank ever waits on a rank above it and
the pipeline cannot deadlock. The order in which each rank sends is fixed by a program that every rank
computes identically, so a receiver knows the sequence of messages each sender will send it and takes
them in that order, keeping those it does not need yet (no tags: gloo and NCCL match by order).

`Clock` separates the time a rank spends waiting for its peers (receives, the end of its sends,
collectives) from the rest (compute); the busy fraction is what is left of the wall time.

This module knows blocks and hidden states only, nothing of merge windows (parallel/scorer.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from slm_fast.parallel.launch import communicate
from slm_fast.runtime.cache import HiddenStateCache, TieredStore
from slm_fast.runtime.stream import BlockRunner, BlockSpec


def search_work(num_blocks: int) -> list[float]:
    """The expected share of a search sweep's block runs at each block: a plan departing from the
    original model at block b runs every block above b, and the searches' plans depart all over the
    model (best-first's growths and SLEB's removals at every free block, the sliding scan's windows
    from the top down), so block k runs about k + 1 plans of a sweep."""
    return [float(k + 1) for k in range(num_blocks)]


@dataclass(frozen=True)
class Slices:
    """[start, stop) of the source blocks owned by each rank, in rank order, covering 0..L-1."""

    bounds: tuple[tuple[int, int], ...]

    @classmethod
    def proportional(cls, num_blocks: int, weights: list[int]) -> Slices:
        """Contiguous slices with sizes in proportion to `weights` (e.g. each rank's bytes for resident
        blocks), every rank at least one block. Needs num_blocks >= len(weights)."""
        ranks = len(weights)
        if num_blocks < ranks:
            raise ValueError(f"{num_blocks} blocks cannot be shared by {ranks} ranks (one block each at least)")
        weights = [max(0, w) for w in weights]
        total = sum(weights)
        if total == 0:
            weights, total = [1] * ranks, ranks
        bounds, start, cumulative = [], 0, 0
        for rank in range(ranks - 1):
            cumulative += weights[rank]
            target = round(num_blocks * cumulative / total)
            stop = min(max(target, start + 1), num_blocks - (ranks - 1 - rank))
            bounds.append((start, stop))
            start = stop
        bounds.append((start, num_blocks))
        return cls(tuple(bounds))

    @classmethod
    def balanced(cls, work: list[float], capacities: list[int]) -> Slices:
        """Contiguous slices with about equal `work` (one weight per block) on every rank, each rank
        holding at most its capacity in blocks (what its memory keeps resident) and at least one. When
        the ranks cannot hold the model together, the slices follow the capacities alone."""
        num_blocks, ranks = len(work), len(capacities)
        capacities = [max(1, c) for c in capacities]
        if sum(capacities) < num_blocks:
            return cls.proportional(num_blocks, capacities)
        total = sum(work)
        bounds, start, done = [], 0, 0.0
        for rank in range(ranks - 1):
            target, stop = total * (rank + 1) / ranks, start + 1
            done += work[start]
            while stop < num_blocks and done + work[stop] / 2 <= target:
                done += work[stop]
                stop += 1
            rest = sum(capacities[rank + 1 :])
            clamped = min(
                max(stop, start + 1, num_blocks - rest), start + capacities[rank], num_blocks - (ranks - 1 - rank)
            )
            done += sum(work[stop:clamped]) - sum(work[clamped:stop])
            bounds.append((start, clamped))
            start = clamped
        bounds.append((start, num_blocks))
        return cls(tuple(bounds))

    @property
    def ranks(self) -> int:
        return len(self.bounds)

    @property
    def last(self) -> int:
        return self.ranks - 1

    @property
    def num_blocks(self) -> int:
        return self.bounds[-1][1]

    def blocks(self, rank: int) -> range:
        return range(*self.bounds[rank])

    def owner(self, block: int) -> int:
        """The rank that runs source block `block`."""
        return next(rank for rank, (start, stop) in enumerate(self.bounds) if start <= block < stop)

    def boundary_owner(self, boundary: int) -> int:
        """The rank that keeps the calibration state at `boundary` (the input of that block; the last
        rank keeps the model's output, boundary L)."""
        return self.last if boundary >= self.num_blocks else self.owner(boundary)

    def to_json(self) -> list[list[int]]:
        return [list(b) for b in self.bounds]


@dataclass
class Clock:
    """Where a rank's time goes: `waiting` on its peers, out of the wall time since `start`."""

    waiting: float = 0.0
    started: float | None = None
    stopped: float | None = None

    def start(self) -> None:
        self.started, self.stopped, self.waiting = time.perf_counter(), None, 0.0

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    def wait(self, call, *args, **kwargs):
        """Run a blocking communication call, counting its time as waiting (a lost peer raises
        DistNetworkError: launch.communicate)."""
        tick = time.perf_counter()
        try:
            return communicate(call, *args, **kwargs)
        finally:
            self.waiting += time.perf_counter() - tick

    @property
    def wall(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped or time.perf_counter()) - self.started

    def to_json(self) -> dict:
        wall = self.wall
        return {
            "wall_s": wall,
            "waiting_s": self.waiting,
            "busy_fraction": (1.0 - self.waiting / wall) if wall > 0 else None,
        }


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks (hidden states, and the small collectives)."""

    states: int = 0
    messages: int = 0
    collectives: int = 0
    per_pass: list[int] = field(default_factory=list)  # hidden-state bytes sent by each search pass

    def to_json(self) -> dict:
        return {
            "state_bytes": self.states,
            "messages": self.messages,
            "collective_bytes": self.collectives,
            "state_bytes_per_search_pass": self.per_pass,
        }


class Link:
    """The hidden-state messages of one pass between this rank and the others.

    `expect(src, keys)` declares the keys rank `src` will send here, in its order; `receive(key)` then
    takes messages from that rank in that order, storing each under its key in `store` until the one
    asked for arrives. `send(tensor, dst)` is non-blocking; `close()` waits for every send to finish.
    """

    def __init__(self, rank: int, store: TieredStore, clock: Clock, traffic: Traffic):
        self.rank, self.store, self.clock, self.traffic = rank, store, clock, traffic
        self._expected: dict[int, deque[Hashable]] = {}
        self._source: dict[Hashable, int] = {}
        self._pending: list[tuple[object, Tensor]] = []

    def expect(self, src: int, keys: Iterable[Hashable]) -> None:
        queue = self._expected.setdefault(src, deque())
        for key in keys:
            queue.append(key)
            self._source[key] = src

    def send(self, tensor: Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self._pending = [(work, t) for work, t in self._pending if not work.is_completed()]
        self._pending.append((communicate(dist.isend, tensor, dst), tensor))
        self.traffic.states += tensor.numel() * tensor.element_size()
        self.traffic.messages += 1

    def receive(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The tensor sent under `key` (every message of that sender before it is stored on the way)."""
        src = self._source[key]
        while key not in self.store:
            arriving = self._expected[src].popleft()
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self.clock.wait(dist.recv, buffer, src)
            self.store.put(arriving, buffer)
        return self.store.get(key)

    def close(self) -> None:
        for work, _ in self._pending:
            self.clock.wait(work.wait)
        self._pending.clear()
        unread = {src: list(keys) for src, keys in self._expected.items() if keys}
        if unread:
            raise RuntimeError(f"rank {self.rank}: messages expected but never taken: {unread}")


def hidden_width(runner: BlockRunner) -> int:
    config = runner.reader.config
    return config.get("text_config", config)["hidden_size"]


def chunk_shape(cache: HiddenStateCache, chunk: int, seq_len: int, hidden_size: int) -> tuple[int, int, int]:
    start, stop = cache.chunks[chunk]
    return (stop - start, seq_len, hidden_size)


def calibrate_slice(
    runner: BlockRunner,
    input_ids: Tensor,
    cache: HiddenStateCache,
    slices: Slices,
    rank: int,
    link: Link,
    *,
    chunk_major: bool = True,
    keep_output: bool = False,
    progress: bool = True,
) -> Tensor | None:
    """The pipelined calibration pass: this rank takes the state entering its slice (embeds the tokens
    on rank 0, receives it from the rank below otherwise), runs its blocks, keeps every boundary state
    entering them, and sends the state leaving the slice to the next rank without waiting. With
    `chunk_major` (the slice's blocks stay resident) it runs chunk by chunk, so the next rank works on
    chunk c while this one runs chunk c + 1; otherwise block by block over all chunks, each block read
    once (the next rank then waits for the slice's end). The last rank keeps boundary L and returns the
    final-norm outputs (the reference); the others return None. `keep_output`: also keep the state
    leaving the slice (the baselines that compare a block's input and output read it)."""
    cache.set_chunks(input_ids.shape[0], runner.micro_batch)
    start, stop = slices.bounds[rank]
    last = rank == slices.last
    chunks, blocks = range(len(cache.chunks)), range(start, stop)
    if rank > 0:
        link.expect(rank - 1, [("boundary", start, chunk) for chunk in chunks])
    order = [(c, b) for c in chunks for b in blocks] if chunk_major else [(c, b) for b in blocks for c in chunks]
    runner.plan([BlockSpec.original(block) for _, block in order])
    seq_len, hidden_size = input_ids.shape[1], hidden_width(runner)
    bar = tqdm(total=len(order), desc="calibrating", unit="block", disable=not progress)
    for chunk, block in order:
        if block == start and rank == 0:
            row_start, row_stop = cache.chunks[chunk]
            cache.put_chunk(start, chunk, runner.embed(input_ids[row_start:row_stop]))
        elif block == start:
            shape = chunk_shape(cache, chunk, seq_len, hidden_size)
            link.receive(("boundary", start, chunk), shape, runner.dtype, runner.device)
        hidden = runner.apply(runner.block(block), block, cache.get_chunk(block, chunk))
        if block + 1 < stop or last or keep_output:
            cache.put_chunk(block + 1, chunk, hidden)
        if block + 1 == stop and not last:
            link.send(hidden, rank + 1)
        bar.update()
    bar.close()
    link.close()
    if not last:
        return None
    reference = None
    for chunk, (row_start, row_stop) in enumerate(cache.chunks):
        final = runner.final_norm(cache.get_chunk(slices.num_blocks, chunk))
        if reference is None:
            reference = final.new_empty((input_ids.shape[0], *final.shape[1:]))
        reference[row_start:row_stop] = final
    return reference
