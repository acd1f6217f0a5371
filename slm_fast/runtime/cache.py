"""Hidden states placed by a memory budget: the compute device (a GPU), host memory (pinned on CUDA),
then disk.

`TierLedger` decides where a tensor of n bytes goes and keeps the books (bytes per tier, peaks, disk
traffic); `TieredStore` holds tensors by key under that ledger; `HiddenStateCache` is the
calibration's view of a store: the hidden state at every block boundary, in chunks of samples.
Boundary i is the input of block i (boundary 0 is the embedding output, boundary L the last block's
output, before the final norm).

Every tensor leaves the store on the compute device, whatever tier held it, so that callers never
combine tensors from two devices. The ledger alone (no tensors) is what the cost model simulates.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

TIERS = ("device", "host", "disk")


class TierLedger:
    """Placement and accounting of byte sizes by key: each new entry goes to the first tier with room."""

    def __init__(self, device_budget_bytes: int = 0, host_budget_bytes: int = 2**62):
        self.budgets = {"device": device_budget_bytes, "host": host_budget_bytes, "disk": 2**62}
        self.used = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.disk_bytes_written = 0
        self.disk_bytes_read = 0
        self._entries: dict[Hashable, tuple[str, int]] = {}

    def place(self, key: Hashable, size: int) -> str:
        """The tier for a new entry (an existing entry under `key` is released first)."""
        self.release(key)
        tier = next(t for t in TIERS if self.used[t] + size <= self.budgets[t])
        self._entries[key] = (tier, size)
        self.used[tier] += size
        self.peak[tier] = max(self.peak[tier], self.used[tier])
        if tier == "disk":
            self.disk_bytes_written += size
        return tier

    def read(self, key: Hashable) -> str:
        tier, size = self._entries[key]
        if tier == "disk":
            self.disk_bytes_read += size
        return tier

    def release(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used[entry[0]] -= entry[1]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        return {
            "used_bytes": dict(self.used),
            "peak_bytes": dict(self.peak),
            "disk_bytes_written": self.disk_bytes_written,
            "disk_bytes_read": self.disk_bytes_read,
        }


def combined_stats(*ledgers: TierLedger) -> dict:
    """The books of several ledgers added up (peaks are the sum of each ledger's peak)."""
    stats = [ledger.stats() for ledger in ledgers]
    return {
        "used_bytes": {t: sum(s["used_bytes"][t] for s in stats) for t in TIERS},
        "peak_bytes": {t: sum(s["peak_bytes"][t] for s in stats) for t in TIERS},
        "disk_bytes_written": sum(s["disk_bytes_written"] for s in stats),
        "disk_bytes_read": sum(s["disk_bytes_read"] for s in stats),
    }


class TieredStore:
    """Tensors by key in the first tier with room; `get` returns them on the compute device.

    On a CPU device the device tier is empty (host memory is the device's memory). On CUDA the host
    tier is pinned, so moving a state back to the GPU is one DMA. The disk tier lives in a temporary
    folder under `spill_dir` (removed by `close`).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        device_budget_bytes: int = 0,
        host_budget_bytes: int = 2**62,
        spill_dir: str | Path | None = None,
    ):
        self.device = torch.device(device)
        on_gpu = self.device.type != "cpu"
        self.ledger = TierLedger(device_budget_bytes if on_gpu else 0, host_budget_bytes)
        self._pin = self.device.type == "cuda"
        self._spill_root = spill_dir
        self._spill: Path | None = None
        self._memory: dict[Hashable, Tensor] = {}
        self._files: dict[Hashable, Path] = {}
        self._next_file = 0

    def put(self, key: Hashable, tensor: Tensor) -> str:
        """Store `tensor` under `key` (replacing what was there); returns the tier it went to."""
        self.discard(key)
        tensor = tensor.detach()
        tier = self.ledger.place(key, tensor.numel() * tensor.element_size())
        if tier == "device":
            self._memory[key] = tensor.to(self.device)
        elif tier == "host":
            if tensor.device.type == "cpu":
                # A view of a larger tensor would keep all of it alive: keep only its own bytes.
                owns = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
                self._memory[key] = tensor if owns else tensor.clone()
            else:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
                self._memory[key] = host.copy_(tensor)
        else:
            path = self._spill_path()
            save_file({"t": tensor.cpu().contiguous()}, path)
            self._files[key] = path
        return tier

    def get(self, key: Hashable) -> Tensor:
        """The tensor under `key`, on the compute device."""
        if key not in self.ledger:
            raise KeyError(f"{key} is not stored")
        tier = self.ledger.read(key)
        tensor = load_file(self._files[key])["t"] if tier == "disk" else self._memory[key]
        return tensor.to(self.device, non_blocking=tier == "host" and self._pin)

    def discard(self, key: Hashable) -> None:
        self.ledger.release(key)
        self._memory.pop(key, None)
        path = self._files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.ledger

    def close(self) -> None:
        for key in list(self._memory) + list(self._files):
            self.discard(key)
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def _spill_path(self) -> Path:
        if self._spill is None:
            if self._spill_root is not None:
                Path(self._spill_root).mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix="slm_fast-states-", dir=self._spill_root))
        self._next_file += 1
        return self._spill / f"{self._next_file:08d}.safetensors"

    def __del__(self) -> None:
        self.close()


class HiddenStateCache:
    """The hidden state at every block boundary, stored in chunks of samples (rows) in a `TieredStore`.

    `chunks` are the sample ranges [start, stop) that the calibration pass stores separately, so that a
    consumer can run one micro-batch of samples at a time; `get(boundary)` joins them. The store may be
    shared with other users of one memory budget (the search's plan states).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        device_budget_bytes: int = 0,
        host_budget_bytes: int = 2**62,
        spill_dir: str | Path | None = None,
        *,
        store: TieredStore | None = None,
    ):
        self.store = store or TieredStore(device, device_budget_bytes, host_budget_bytes, spill_dir)
        self.device = self.store.device
        self.chunks: list[tuple[int, int]] = []

    def set_chunks(self, num_samples: int, rows_per_chunk: int | None) -> None:
        rows = rows_per_chunk or num_samples
        self.chunks = [(start, min(start + rows, num_samples)) for start in range(0, num_samples, rows)]

    def put(self, boundary: int, hidden: Tensor) -> None:
        """Store a whole boundary [N, S, d], split into the cache's chunks (one chunk if none were set)."""
        if boundary in self:
            raise KeyError(f"boundary {boundary} is cached already")
        if not self.chunks:
            self.set_chunks(hidden.shape[0], None)
        for index, (start, stop) in enumerate(self.chunks):
            self.put_chunk(boundary, index, hidden[start:stop])

    def put_chunk(self, boundary: int, chunk: int, hidden: Tensor) -> None:
        self.store.put(("boundary", boundary, chunk), hidden)

    def get_chunk(self, boundary: int, chunk: int) -> Tensor:
        if ("boundary", boundary, chunk) not in self.store:
            raise KeyError(f"boundary {boundary} is not cached")
        return self.store.get(("boundary", boundary, chunk))

    def get(self, boundary: int) -> Tensor:
        parts = [self.get_chunk(boundary, index) for index in range(max(1, len(self.chunks)))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def __contains__(self, boundary: int) -> bool:
        return ("boundary", boundary, 0) in self.store

    def placement(self) -> dict[str, int]:
        """Bytes held in each tier (by everything in the store)."""
        return dict(self.store.ledger.used)

    def close(self) -> None:
        self.store.close()
