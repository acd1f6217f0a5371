"""A user's own text files: .txt (whole, or one document per blank-line-separated paragraph), .jsonl
(one document per line, from a string field) and .parquet (a string column)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from slm_fast.errors import InputError

TxtUnit = Literal["paragraph", "file"]
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_text_file(path: Path, *, field: str = "text", txt_unit: TxtUnit = "paragraph") -> list[str]:
    """The documents of a .txt, .jsonl or .parquet file (by suffix); InputError when it holds none."""
    if not path.is_file():
        raise InputError(f"corpus file {path} does not exist")
    if path.suffix == ".txt":
        documents = read_txt(path, txt_unit)
    elif path.suffix == ".jsonl":
        documents = read_jsonl(path, field)
    elif path.suffix == ".parquet":
        documents = read_parquet(path, field)
    else:
        raise InputError(f"{path}: unknown corpus file type; use one of {', '.join(FILE_SUFFIXES)}")
    if not documents:
        raise InputError(f"corpus file {path} holds no text (it is empty)")
    return documents


def read_txt(path: Path, unit: TxtUnit = "paragraph") -> list[str]:
    """The file as one document, or its paragraphs (separated by blank lines) as documents."""
    text = _read_utf8(path)
    if unit == "file":
        documents = [text.strip()]
    elif unit == "paragraph":
        documents = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
    else:
        raise InputError(f"txt unit must be 'paragraph' or 'file', got {unit!r}")
    return [d for d in documents if d]


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    """The string `field` of every JSON object line; blank lines are skipped."""
    documents = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = f" (it has {', '.join(map(repr, record))})" if isinstance(record, dict) else ""
            raise InputError(f"{path}:{number}: no string field {field!r}{keys}; choose one with --calib-field")
        documents.append(value)
    return documents


def read_parquet(path: Path, field: str = "text") -> list[str]:
    """The non-null strings of column `field`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
    return string_column(schema.names, lambda: pq.read_table(path, columns=[field]).column(field), field, str(path))


def string_column(names: list[str], column, field: str, source: str) -> list[str]:
    """The non-null values of string column `field` (`column()` reads it), after checking it exists."""
    import pyarrow as pa

    if field not in names:
        raise InputError(f"{source} has no field {field!r} (fields: {', '.join(names)}); choose one with --calib-field")
    values = column()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise InputError(f"{source}: field {field!r} holds {values.type}, not text")
    return [v for v in values.to_pylist() if v]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
