"""A user's own text: a .txt file (whole, or one document per paragraph) or a .jsonl file (one
document per line, from a string field)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from slm_fast.errors import InputError

TxtUnit = Literal["paragraph", "file"]


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
            raise InputError(f"{path}:{number}: no string field {field!r}")
        documents.append(value)
    return documents


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
