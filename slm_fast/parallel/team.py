"""The ranks of a distributed command as one team: who is who, failing together on bad input, and
sharing small Python values (options, token ids, scores recorded by a journal).

A check that can fail on one rank only (a path missing on one host, a work folder that only rank 0
reads) must not leave the other ranks waiting in the next collective: each rank runs its checks, then
`agree` raises on every rank, with the failing rank's own message, when any rank failed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from slm_fast.errors import InputError, SlmFastError
from slm_fast.parallel.launch import communicate


@dataclass(frozen=True)
class Team:
    rank: int
    size: int
    local_rank: int
    local_size: int  # ranks on this host (they share its memory)

    @classmethod
    def current(cls) -> Team | None:
        """The default process group as a team; None when this process runs alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        size = dist.get_world_size()
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        return cls(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", 0)), local_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> int:
        return self.size - 1

    def agree(self, error: SlmFastError | None) -> None:
        """Raise on every rank if any rank hit an error: a rank's own error, else the first failing
        rank's message (as an InputError: the other rank's input was at fault)."""
        messages: list[str | None] = [None] * self.size
        communicate(dist.all_gather_object, messages, None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            rank, text = failed[0]
            raise InputError(f"{text} (on rank {rank})")

    @contextmanager
    def checks(self):
        """Run the block's checks on this rank, then agree (an error of ours anywhere stops every rank;
        other exceptions are bugs and propagate, the other ranks then fail on the lost peer)."""
        error = None
        try:
            yield
        except SlmFastError as exc:
            error = exc
        self.agree(error)

    def share(self, value: object, src: int = 0) -> object:
        """`value` as rank `src` has it (a small picklable object), on every rank."""
        box = [value if self.rank == src else None]
        communicate(dist.broadcast_object_list, box, src=src)
        return box[0]

    def gather(self, value: object) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        out: list[object] = [None] * self.size
        communicate(dist.all_gather_object, out, value)
        return out
