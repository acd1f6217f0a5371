"""The safetensors file format at the byte level: header parsing with validation, and header building.

Parsing the header ourselves (8-byte little-endian length, JSON, data section) lets a truncated or
corrupt shard fail with a message naming the file and the tensor, before any memory map is opened.
Building headers ourselves lets the writer lay out a whole shard in advance and stream tensors into
it one block at a time instead of buffering the shard in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from slm_fast.errors import CheckpointError

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_CODES.items()}
HEADER_ALIGNMENT = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit in a shard (offsets relative to the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    data_start: int  # byte offset of the data section in the file
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a shard's header: every entry's dtype, shape and offsets must be consistent
    and the file must be long enough to hold the data section."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {file_size})"
                )
            raw = handle.read(header_len)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: shard file is missing") from exc
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = parsed.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries = {}
    for name, spec in parsed.items():
        entries[name] = _parse_entry(path, name, spec)
    data_len = max((e.end for e in entries.values()), default=0)
    if data_start + data_len > file_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {data_start + data_len} bytes, file has {file_size}"
        )
    return ShardHeader(path=path, data_start=data_start, entries=entries, metadata=metadata)


def _parse_entry(path: Path, name: str, spec: object) -> TensorEntry:
    try:
        dtype = DTYPE_CODES[spec["dtype"]]  # type: ignore[index]
        shape = tuple(int(s) for s in spec["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in spec["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {spec}") from exc
    if end - begin != tensor_nbytes(dtype, shape) or begin < 0:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name!r} {spec['dtype']}{list(shape)} "  # type: ignore[index]
            f"does not fit its offsets [{begin}, {end})"
        )
    return TensorEntry(dtype=dtype, shape=shape, begin=begin, end=end)


def build_header(
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, TensorEntry]]:
    """Header bytes (length prefix included, padded to 8 bytes) for tensors laid out contiguously in
    the given order, and each tensor's entry."""
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name, dtype, shape in layout:
        size = tensor_nbytes(dtype, shape)
        entries[name] = TensorEntry(dtype=dtype, shape=tuple(shape), begin=offset, end=offset + size)
        offset += size
    header: dict[str, object] = {"__metadata__": metadata}
    for name, entry in entries.items():
        header[name] = {
            "dtype": CODE_OF_DTYPE[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % HEADER_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw, entries
