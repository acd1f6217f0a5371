"""Reader for R's XDR serialization and R lazy-load databases (`NAME.rdx` + `NAME.rdb`), enough to
read the data sets an R package ships (character, logical, integer, double vectors, lists, names)
without R.

A lazy-load database is an index, `NAME.rdx` (a gzip file holding the serialization of
`list(variables = list(<name> = c(offset, length), ...), references = ..., compressed = TRUE)`),
and `NAME.rdb`, the concatenated records it points at. Each record is a 4-byte big-endian
uncompressed length followed by a zlib stream of one serialized object.

Serialization (R Internals, "Serialization formats"): a header `X\\n`, three ints (format version,
writer version, minimal reader version) and, in version 3, the native encoding; then items. Each item
starts with an int of flags: SEXP type in the low byte, bit 8 "is object", bit 9 "has attributes",
bit 10 "has tag", and the CHARSXP encoding bits from bit 12 up.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_fast.errors import AssetError

_SYMSXP, _LISTSXP, _CHARSXP = 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 10, 13, 14, 16, 19
_NILVALUE_SXP, _REFSXP = 254, 255
_NA_INTEGER = -(2**31)
# CHARSXP encoding flags, already shifted down by 12 bits ("levels").
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass
class RVector:
    """An R vector: `values` (None for NA) and its attributes by name (e.g. "names")."""

    sexptype: int
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, Any]:
        """The elements keyed by the vector's `names` attribute."""
        names = self.attributes.get("names")
        if not isinstance(names, RVector) or len(names.values) != len(self.values):
            raise ValueError("vector has no names attribute of matching length")
        return dict(zip(names.values, self.values, strict=True))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("not an XDR (binary big-endian) R serialization")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal R version to read it
        if version == 3:
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"unsupported serialization format version {version}")

    def item(self) -> Any:
        flags = self.int()
        sexptype, levels = flags & 0xFF, flags >> 12
        has_attributes, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype == _NILVALUE_SXP:
            return None
        if sexptype == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexptype == _SYMSXP:
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if sexptype == _LISTSXP:
            return self.pairlist(has_attributes, has_tag)
        if sexptype == _CHARSXP:
            return self.charsxp(levels)
        if sexptype in (_LGLSXP, _INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            values: list[Any] = [None if v == _NA_INTEGER else v for v in ints]
        elif sexptype == _REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif sexptype in (_STRSXP, _VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported SEXP type {sexptype} at byte {self.pos - 4}")
        attributes = self.attributes() if has_attributes else {}
        return RVector(sexptype, values, attributes)

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & _UTF8:
            return raw.decode("utf-8")
        if levels & _LATIN1:
            return raw.decode("latin-1")
        if levels & _ASCII:
            return raw.decode("ascii")
        return raw.decode(self.native_encoding)

    def pairlist(self, has_attributes: bool, has_tag: bool) -> list[tuple[str | None, Any]]:
        """A pairlist as (tag, value) pairs; its own attributes are read and dropped."""
        if has_attributes:
            self.item()
        tag = self.item() if has_tag else None
        value = self.item()
        rest = self.item()
        return [(tag.name if isinstance(tag, RSymbol) else None, value), *(rest or [])]

    def attributes(self) -> dict[str, Any]:
        pairs = self.item()
        return {tag: value for tag, value in pairs or [] if tag is not None}


def unserialize(data: bytes) -> Any:
    """Decode one R object from its XDR serialization (what `serialize()`/`saveRDS` write)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def load_lazyload_database(base: Path) -> dict[str, Any]:
    """Every variable of the lazy-load database `base`.rdx/`base`.rdb, by name."""
    rdx, rdb = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    for path in (rdx, rdb):
        if not path.is_file():
            raise AssetError(f"missing R lazy-load database file {path}")
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes())).by_name()
        if index["compressed"].values != [1]:
            raise ValueError(f"records compressed with method {index['compressed'].values}, not zlib")
        database = rdb.read_bytes()
        variables = {}
        for name, location in index["variables"].by_name().items():
            offset, length = location.values
            record = database[offset : offset + length]
            (expected,) = struct.unpack(">I", record[:4])
            payload = zlib.decompress(record[4:])
            if len(payload) != expected:
                raise ValueError(f"record {name!r} inflates to {len(payload)} bytes, not {expected}")
            variables[name] = unserialize(payload)
    except (ValueError, KeyError, AttributeError, OSError, zlib.error, struct.error) as exc:
        raise AssetError(f"{base}.rdx/.rdb is not a readable R lazy-load database: {exc}") from exc
    return variables
