"""Where StreamingCKA keeps the tokens seen so far (exact RBF pairs every new token with all earlier ones).

- MemoryTokenStore: on the activations' device, in segments of at most SEGMENT_TOKENS tokens (the last
  one grows by doubling), so memory stays within one segment of n x sum(d) elements and no append
  copies earlier tokens more than once.
- DiskTokenStore: one raw file per layer in a fresh temporary folder (tempfile.mkdtemp, `directory`
  chooses where), read back through numpy memory maps; only pages being paired are resident. The folder
  is deleted by close(), and otherwise when the store is garbage collected or the interpreter exits.

Both store the activations in their own dtype (bf16 stays 2 bytes a value) and copy what they are given,
so callers may reuse their buffers.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from slm_fast.errors import InputError

SEGMENT_TOKENS = 16384
_FIRST_CAPACITY = 256


class TokenStore(ABC):
    """Append-only [n, d_a] token tables, one per layer."""

    def __init__(self, widths: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        self.widths = list(widths)
        self.dtype = dtype
        self.device = device
        self.num_tokens = 0

    @abstractmethod
    def append(self, layers: Sequence[Tensor]) -> None: ...

    @abstractmethod
    def read(self, layer: int, start: int, stop: int) -> Tensor:
        """Tokens [start, stop) of `layer` on the store's device (a view where the store allows)."""

    def ranges(self, stop: int) -> list[tuple[int, int]]:
        """[0, stop) cut into pieces of at most SEGMENT_TOKENS that `read` serves without a copy."""
        return [(s, min(s + SEGMENT_TOKENS, stop)) for s in range(0, stop, SEGMENT_TOKENS)]

    @abstractmethod
    def close(self) -> None:
        """Release the stored tokens."""


class MemoryTokenStore(TokenStore):
    def __init__(self, widths: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(widths, dtype, device)
        self._segments: list[list[Tensor]] = []  # per segment, one [capacity, d_a] tensor per layer
        self._filled = 0  # tokens in the last segment

    def append(self, layers: Sequence[Tensor]) -> None:
        count, done = layers[0].shape[0], 0
        while done < count:
            room = self._make_room(count - done)
            take = min(room, count - done)
            for table, x in zip(self._segments[-1], layers, strict=True):
                table[self._filled : self._filled + take] = x[done : done + take]
            self._filled += take
            done += take
        self.num_tokens += count

    def _make_room(self, wanted: int) -> int:
        """Free rows in the last segment, growing it or opening a new one first if it is full."""
        capacity = self._segments[-1][0].shape[0] if self._segments else 0
        if self._segments and self._filled < capacity:
            return capacity - self._filled
        if self._segments and capacity < SEGMENT_TOKENS:
            grown = min(SEGMENT_TOKENS, max(2 * capacity, self._filled + wanted))
            self._segments[-1] = [self._resize(table, grown) for table in self._segments[-1]]
            return grown - self._filled
        first = min(SEGMENT_TOKENS, max(_FIRST_CAPACITY, wanted))
        self._segments.append([self._empty(first, w) for w in self.widths])
        self._filled = 0
        return first

    def _empty(self, rows: int, width: int) -> Tensor:
        return torch.empty(rows, width, dtype=self.dtype, device=self.device)

    def _resize(self, table: Tensor, rows: int) -> Tensor:
        grown = self._empty(rows, table.shape[1])
        grown[: self._filled] = table[: self._filled]
        return grown

    def read(self, layer: int, start: int, stop: int) -> Tensor:
        first, last = start // SEGMENT_TOKENS, (stop - 1) // SEGMENT_TOKENS
        if first == last:
            offset = first * SEGMENT_TOKENS
            return self._segments[first][layer][start - offset : stop - offset]
        pieces, s = [], start
        while s < stop:
            e = min((s // SEGMENT_TOKENS + 1) * SEGMENT_TOKENS, stop)
            pieces.append(self.read(layer, s, e))
            s = e
        return torch.cat(pieces)

    def close(self) -> None:
        self._segments = []


class DiskTokenStore(TokenStore):
    def __init__(
        self, widths: Sequence[int], dtype: torch.dtype, device: torch.device, directory: str | Path | None = None
    ) -> None:
        super().__init__(widths, dtype, device)
        self.folder = Path(tempfile.mkdtemp(prefix="slm_fast_tokens_", dir=directory))
        self._row_bytes = [w * torch.finfo(dtype).bits // 8 for w in widths]
        self._files: list[BinaryIO] = [open(self.folder / f"layer{a}.bin", "ab") for a in range(len(widths))]  # noqa: SIM115
        self._finalizer = weakref.finalize(self, _remove, self._files, self.folder)

    def append(self, layers: Sequence[Tensor]) -> None:
        for handle, x in zip(self._files, layers, strict=True):
            raw = x.detach().to("cpu", self.dtype).contiguous().view(torch.uint8)
            handle.write(raw.numpy().tobytes())
            handle.flush()
        self.num_tokens += layers[0].shape[0]

    def read(self, layer: int, start: int, stop: int) -> Tensor:
        row_bytes = self._row_bytes[layer]
        mapped = np.memmap(
            self.folder / f"layer{layer}.bin",
            dtype=np.uint8,
            mode="c",  # private copy-on-write map: a writable array, so torch wraps it without a warning
            offset=start * row_bytes,
            shape=((stop - start) * row_bytes,),
        )
        table = torch.from_numpy(mapped).view(self.dtype).view(stop - start, self.widths[layer])
        return table.to(self.device)

    def close(self) -> None:
        self._finalizer()


def _remove(files: list[BinaryIO], folder: Path) -> None:
    for handle in files:
        handle.close()
    shutil.rmtree(folder, ignore_errors=True)


def open_store(
    kind: str, widths: Sequence[int], dtype: torch.dtype, device: torch.device, directory: str | Path | None
) -> TokenStore:
    if kind == "memory":
        return MemoryTokenStore(widths, dtype, device)
    if kind == "disk":
        return DiskTokenStore(widths, dtype, device, directory)
    raise InputError(f"store must be 'memory' or 'disk', got {kind!r}")
