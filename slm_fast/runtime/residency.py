"""Which built blocks stay in memory under a byte budget.

A sweep knows which blocks it will run and in what order, so the choice can be Belady's: when room is
needed, the block whose next use is furthest away goes, and a new block is not kept at all when every
resident block is needed sooner. Uses after the end of the announced plan are assumed to repeat the
plan (searches sweep the model again and again), which on a bottom-up sweep over more blocks than fit
keeps a fixed set resident instead of evicting each block just before its reuse, as LRU does.
Without a plan the policy falls back to LRU.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Hashable, Sequence

NEVER = float("inf")


class PlannedResidency:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.sizes: OrderedDict[Hashable, int] = OrderedDict()  # resident keys, least recently used first
        self.used_bytes = 0
        self._plan: list[Hashable] = []
        self._positions: dict[Hashable, list[int]] = {}
        self._cursor = -1

    def plan(self, keys: Sequence[Hashable]) -> None:
        """Announce the keys the next accesses will ask for, in order."""
        self._plan = list(keys)
        self._positions = {}
        for position, key in enumerate(self._plan):
            self._positions.setdefault(key, []).append(position)
        self._cursor = -1

    def upcoming(self) -> list[Hashable]:
        """The planned keys after the current position."""
        return self._plan[self._cursor + 1 :]

    def access(self, key: Hashable) -> bool:
        """Record a use of `key`; True if it is resident."""
        positions = self._positions.get(key)
        if positions:
            index = bisect.bisect_right(positions, self._cursor)
            if index < len(positions):
                self._cursor = positions[index]
        if key in self.sizes:
            self.sizes.move_to_end(key)
            return True
        return False

    def admit(self, key: Hashable, size: int) -> list[Hashable] | None:
        """Decide whether a block just built is kept: None if not, else the keys to evict for it."""
        if size > self.budget_bytes:
            return None
        if not self._plan:
            evict = []
            free = self.budget_bytes - self.used_bytes
            for resident in self.sizes:  # least recently used first
                if free >= size:
                    break
                evict.append(resident)
                free += self.sizes[resident]
        else:
            mine = self._next_use(key)
            evict, free = [], self.budget_bytes - self.used_bytes
            for resident in sorted(self.sizes, key=self._next_use, reverse=True):
                if free >= size:
                    break
                if self._next_use(resident) <= mine:
                    return None  # everything left is needed sooner than the newcomer
                evict.append(resident)
                free += self.sizes[resident]
            if free < size:
                return None
        for resident in evict:
            self.used_bytes -= self.sizes.pop(resident)
        self.sizes[key] = size
        self.used_bytes += size
        return evict

    def _next_use(self, key: Hashable) -> float:
        positions = self._positions.get(key)
        if not positions:
            return NEVER
        index = bisect.bisect_right(positions, self._cursor)
        if index < len(positions):
            return positions[index]
        return len(self._plan) + positions[0]  # in the next sweep, if it repeats this one
