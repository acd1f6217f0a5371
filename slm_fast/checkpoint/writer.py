"""Streaming sharded safetensors writer.

The whole output layout (every tensor's name, dtype and shape) is known before any weight is
computed, so the shards are planned up front: each shard file gets its final header and its full
size reserved (posix_fallocate, so a full disk fails at once rather than half-way), and tensors are
then written straight to their offsets as they are produced. Nothing is buffered: memory stays at
the block being written, not a shard (mergekit buffers a whole shard in RAM).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slm_fast.checkpoint.reader import INDEX_NAME, SINGLE_NAME
from slm_fast.checkpoint.safetensors_format import TensorEntry, build_header, tensor_nbytes
from slm_fast.errors import CheckpointError

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 bytes; also KB, MB, TB, GiB-style suffixes and plain integers."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    try:
        value = float(number) * units[cleaned[len(number) :]]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read size {text!r} (examples: 2GB, 500MB, 1GiB)") from exc
    if value <= 0:
        raise CheckpointError(f"size {text!r} must be positive")
    return int(value)


@dataclass
class _Shard:
    path: Path
    layout: list[TensorSpec] = field(default_factory=list)
    nbytes: int = 0
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    data_start: int = 0
    fd: int | None = None
    pending: set[str] = field(default_factory=set)


class ShardedWriter:
    """Write a planned set of tensors into `folder` as safetensors shards plus the index.

    `layout` fixes the order and shapes; `write(name, tensor)` may come in any order, each name once;
    `finish()` checks that every tensor arrived, syncs the shards and writes the index.
    """

    def __init__(self, folder: Path, layout: list[TensorSpec], max_shard_bytes: int):
        self.folder = folder
        self.total_bytes = sum(tensor_nbytes(dtype, shape) for _, dtype, shape in layout)
        self.shards = _plan_shards(layout, max_shard_bytes)
        self._shard_of: dict[str, _Shard] = {}
        for index, shard in enumerate(self.shards):
            shard.path = folder / _shard_name(index, len(self.shards))
            header, shard.entries = build_header(shard.layout, {"format": "pt"})
            shard.data_start = len(header)
            shard.pending = set(shard.entries)
            self._shard_of.update(dict.fromkeys(shard.entries, shard))
            shard.fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _reserve(shard.fd, shard.path, shard.data_start + shard.nbytes)
            _pwrite_all(shard.fd, shard.path, memoryview(header), 0)
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard_of.get(name)
        if shard is None or name not in shard.pending:
            raise ValueError(f"tensor {name!r} is not expected by the layout, or was written already")
        entry = shard.entries[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype}{list(tensor.shape)}, layout says {entry.dtype}{list(entry.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(shard.fd, shard.path, memoryview(data), shard.data_start + entry.begin)
        shard.pending.discard(name)
        self.bytes_written += entry.nbytes

    def finish(self) -> list[Path]:
        """Sync and close every shard, write the index (when there are several shards)."""
        missing = sorted(n for shard in self.shards for n in shard.pending)
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:3]}")
        for shard in self.shards:
            os.fsync(shard.fd)
            os.close(shard.fd)
            shard.fd = None
        files = [shard.path for shard in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: shard.path.name for shard in self.shards for name in shard.entries},
            }
            index_path = self.folder / INDEX_NAME
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            files.append(index_path)
        return files

    def abort(self) -> None:
        for shard in self.shards:
            if shard.fd is not None:
                os.close(shard.fd)
                shard.fd = None


def _plan_shards(layout: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy, in layout order: a shard is closed when the next tensor would overflow it (a tensor
    larger than the limit gets a shard of its own)."""
    shards = [_Shard(path=Path())]
    for name, dtype, shape in layout:
        size = tensor_nbytes(dtype, shape)
        if shards[-1].layout and shards[-1].nbytes + size > max_shard_bytes:
            shards.append(_Shard(path=Path()))
        shards[-1].layout.append((name, dtype, tuple(shape)))
        shards[-1].nbytes += size
    return shards


def _shard_name(index: int, count: int) -> str:
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _reserve(fd: int, path: Path, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: not enough disk space to reserve {size:,} bytes") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
            raise


def _pwrite_all(fd: int, path: Path, data: memoryview, offset: int) -> None:
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: disk full while writing (no space left on device)") from exc
        raise
