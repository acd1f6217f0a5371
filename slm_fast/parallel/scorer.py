"""The search's candidate scoring over a pipeline of ranks (parallel/pipeline.py).

Every rank runs the same search loop with a `PipelineScorer`; its `score_plans` and `score` are
collective calls that return the same scores on every rank, so the searches (best-first, the sliding
scan, LaCo, SLEB) run unchanged and take the same decisions everywhere.

A sweep is the one-process sweep (slm.sweep_schedule, slm.SharedStates) cut at the slice boundaries
(`SweepProgram`): a window that starts at source block b runs on the rank owning b (a window reaching
past that rank's slice reads its upper blocks from the checkpoint there: the slice's blocks are the
ones kept resident, not the only ones a rank may read); a plan state goes from the rank that computed
it to each rank that runs a later window of a plan holding it, and to the last rank, which applies the
final norm and the criterion. A plan entering at a boundary takes the calibration state from the rank
that keeps that boundary. Each rank runs its part chunk by chunk (all of its windows on chunk 0, then
chunk 1, ...), so the next rank starts on chunk 0 while this one runs chunk 1: with C chunks and W
ranks a sweep whose plans all cross every slice keeps about C / (C + W - 1) of the ranks busy. The
last rank broadcasts the scores (a few floats).

`score(committed, windows)` (the sliding scan and LaCo) is computed as the plans "the windows committed
above, plus one of `windows`", entering at the window's lowest block: the same computation as the
one-process `score`, in the sweep's chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from slm_fast.parallel.pipeline import Clock, Link, Slices, Traffic, chunk_shape, hidden_width
from slm_fast.slm import CandidateScorer, Committed, Entry, SharedStates, sweep_schedule
from slm_fast.windows import Window, output_blocks

Source = int | Entry  # a plan state id, or the calibration state at a boundary


@dataclass(frozen=True)
class Move:
    """Run `window` (starting at source block `block`) on state `source`, giving state `target`."""

    block: int
    window: Window
    source: Source
    target: int


class SweepProgram:
    """What each rank runs and sends in the sweep scoring `plans`, computed identically on every rank.

    moves: the one-process sweep's steps in its order; finals: the state each plan ends with.
    home(source): the rank holding a source; consumers[source]: the ranks using it, in first-use order.
    """

    def __init__(self, plans: list[tuple[Window, ...]], slices: Slices):
        self.slices = slices
        shared = SharedStates(plans)
        self.moves = [
            Move(block, window, source, target)
            for block, groups in sweep_schedule(plans, slices.num_blocks)
            for window, members in groups
            for source, target in shared.advance(members)
        ]
        self.finals: list[Source] = [shared.source(index) for index in range(len(plans))]
        self._producer = {move.target: slices.owner(move.block) for move in self.moves}
        self.consumers: dict[Source, list[int]] = {}
        for source, rank in [(m.source, slices.owner(m.block)) for m in self.moves] + [
            (s, slices.last) for s in self.finals
        ]:
            users = self.consumers.setdefault(source, [])
            if rank not in users:
                users.append(rank)

    def home(self, source: Source) -> int:
        if isinstance(source, Entry):
            return self.slices.boundary_owner(source.boundary)
        return self._producer[source]

    def moves_of(self, rank: int) -> list[Move]:
        return [move for move in self.moves if self.slices.owner(move.block) == rank]

    def remote_consumers(self, source: Source) -> list[int]:
        home = self.home(source)
        return [rank for rank in self.consumers.get(source, []) if rank != home]

    def entry_sends(self, rank: int) -> list[tuple[Entry, int]]:
        """The calibration states this rank sends at the start of each chunk, in order."""
        return [
            (source, dst)
            for source in self.consumers
            if isinstance(source, Entry) and self.home(source) == rank
            for dst in self.remote_consumers(source)
        ]

    def sends(self, rank: int) -> list[tuple[tuple, int]]:
        """(message name, destination) of everything `rank` sends per chunk, in its order."""
        out = [(("entry", entry.boundary), dst) for entry, dst in self.entry_sends(rank)]
        for move in self.moves_of(rank):
            out += [(("state", move.target), dst) for dst in self.remote_consumers(move.target)]
        return out

    def incoming(self, rank: int, chunks: int, chunk_major: list[bool]) -> dict[int, list[tuple]]:
        """For each sender, the message keys it sends `rank`, in its order: chunk by chunk where the
        sender runs chunk-major, else message by message (each over every chunk)."""
        out = {}
        for src in range(rank):
            names = [name for name, dst in self.sends(src) if dst == rank]
            if names and chunk_major[src]:
                out[src] = [(*name, chunk) for chunk in range(chunks) for name in names]
            elif names:
                out[src] = [(*name, chunk) for name in names for chunk in range(chunks)]
        return out

    def last_uses(self, rank: int) -> dict[Source, int]:
        """The position of each source's last use in `rank`'s steps (its moves, then on the last rank
        one step per plan's final)."""
        steps = [move.source for move in self.moves_of(rank)]
        if rank == self.slices.last:
            steps += self.finals
        return {source: position for position, source in enumerate(steps)}


class PipelineScorer(CandidateScorer):
    """CandidateScorer whose sweeps run over the pipeline's ranks (see the module docstring). Every
    rank must make the same calls in the same order; `reference` is needed on the last rank only."""

    def __init__(
        self,
        *args,
        slices: Slices,
        rank: int,
        clock: Clock,
        traffic: Traffic,
        chunk_major: list[bool] | None = None,
        **kwargs,
    ):
        """`chunk_major[r]`: rank r runs its part chunk by chunk (its slice's blocks stay resident), or
        else window by window over all chunks (each block built once per sweep; no chunk overlap)."""
        super().__init__(*args, **kwargs)
        self.slices, self.rank, self.clock, self.traffic = slices, rank, clock, traffic
        self.chunk_major = chunk_major or [True] * slices.ranks

    def _score_windows(self, above: Committed, windows: list[Window]) -> list[float]:
        """The sliding scan's and LaCo's candidates as plans: the windows committed above plus one of
        `windows`, entering at the window's lowest block (the one-process computation, in chunks)."""
        plans = [tuple(output_blocks([window, *above], self.runner.num_blocks)) for window in windows]
        return self._pipeline_sweep(plans)

    def _sweep(self, todo: list[tuple[Window, ...]]) -> None:
        for key, score in zip(todo, self._pipeline_sweep(todo), strict=True):
            self.plan_scores[key] = score
            if self.on_scored is not None:
                self.on_scored("plan", key, score)

    def _pipeline_sweep(self, plans: list[tuple[Window, ...]]) -> list[float]:
        """This rank's part of the sweep scoring `plans`; the scores, the same on every rank."""
        program = SweepProgram(plans, self.slices)
        rank, runner, store, cache = self.rank, self.runner, self.states, self.cache
        chunks = range(len(cache.chunks))
        seq_len, width = self.input_ids.shape[1], hidden_width(runner)
        link = Link(rank, store, self.clock, self.traffic)
        incoming = program.incoming(rank, len(chunks), self.chunk_major)
        for src, keys in incoming.items():
            link.expect(src, keys)
        sent_before = self.traffic.states
        mine = program.moves_of(rank)
        last_use = program.last_uses(rank)
        entries = [(chunk, entry, dst) for entry, dst in program.entry_sends(rank) for chunk in chunks]
        if self.chunk_major[rank]:  # (chunk, position in `mine`) in the order this rank runs them
            order = [(chunk, position) for chunk in chunks for position in range(len(mine))]
            entries.sort(key=lambda e: e[0])  # each chunk's entries before that chunk's windows
        else:
            order = [(chunk, position) for position in range(len(mine)) for chunk in chunks]
        runner.plan([self.spec(mine[position].window) for _, position in order])

        def fetch(source: Source, chunk: int):
            if program.home(source) != rank:
                name = ("entry", source.boundary) if isinstance(source, Entry) else ("state", source)
                shape = chunk_shape(cache, chunk, seq_len, width)
                return link.receive((*name, chunk), shape, runner.dtype, runner.device)
            if isinstance(source, Entry):
                return cache.get_chunk(source.boundary, chunk)
            return store.get(("state", source, chunk))

        def release(source: Source, chunk: int) -> None:
            if isinstance(source, Entry):
                if program.home(source) != rank:
                    store.discard(("entry", source.boundary, chunk))
            else:
                store.discard(("state", source, chunk))

        scores = torch.zeros(len(plans), dtype=torch.float64)
        try:
            entry_at = 0  # chunk-major: a chunk's entries go out when the rank reaches that chunk
            for chunk, position in order:
                while entry_at < len(entries) and (not self.chunk_major[rank] or entries[entry_at][0] <= chunk):
                    entry_chunk, entry, dst = entries[entry_at]
                    link.send(cache.get_chunk(entry.boundary, entry_chunk), dst)
                    entry_at += 1
                move = mine[position]
                spec = self.spec(move.window)
                hidden = runner.apply(runner.block(spec), spec.layer_index, fetch(move.source, chunk))
                if move.target in last_use:
                    store.put(("state", move.target, chunk), hidden)
                for dst in program.remote_consumers(move.target):
                    link.send(hidden, dst)
                if last_use[move.source] == position:
                    release(move.source, chunk)
            for entry_chunk, entry, dst in entries[entry_at:]:  # a rank with no windows of its own
                link.send(cache.get_chunk(entry.boundary, entry_chunk), dst)
            if rank == self.slices.last:
                for index, source in enumerate(program.finals):
                    finals = (runner.final_norm(fetch(source, chunk)) for chunk in chunks)
                    scores[index] = self._similarity(finals)
                    if last_use[source] == len(mine) + index:
                        for chunk in chunks:
                            release(source, chunk)
            link.close()
        finally:
            produced = [("state", m.target, c) for m in program.moves for c in chunks]
            for key in produced + [key for keys in incoming.values() for key in keys]:
                store.discard(key)
        self.traffic.per_pass.append(self.traffic.states - sent_before)
        self.traffic.collectives += scores.numel() * scores.element_size()
        self.clock.wait(dist.broadcast, scores, self.slices.last)
        return scores.tolist()
