"""Calibration text from the `datasets` library: a folder written by `save_to_disk`, or a dataset spec
`NAME[:CONFIG][:SPLIT]` loaded with `load_dataset` from the local datasets cache only (offline mode, as
with HF_DATASETS_OFFLINE=1, whatever the environment says: like models given as Hub ids, nothing is
downloaded during a run). The split defaults to `train`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from slm_fast.data.user_files import string_column
from slm_fast.errors import InputError

DEFAULT_SPLIT = "train"


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def read_saved_dataset(folder: Path, field: str = "text", split: str = DEFAULT_SPLIT) -> list[str]:
    """The documents of a save_to_disk folder (a DatasetDict contributes its `split`)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a readable save_to_disk dataset folder ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _split(loaded, split, str(folder))
    return _documents(loaded, field, str(folder))


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """'NAME[:CONFIG][:SPLIT]' -> (name, config or None, split)."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise InputError(f"dataset spec {spec!r} is not of the form NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else DEFAULT_SPLIT
    return name, config, split


def read_dataset_spec(spec: str, field: str = "text") -> list[str]:
    """The documents of `spec`'s split through `datasets.load_dataset`."""
    import datasets

    name, config, split = parse_dataset_spec(spec)
    try:
        with _offline(datasets.config):
            loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError...)
        raise InputError(
            f"calibration dataset {spec!r} could not be loaded from the local datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}; offline, as with HF_DATASETS_OFFLINE=1): "
            f"{type(exc).__name__}: {exc}. Load it once where the Hub is reachable (datasets.load_dataset), or give "
            "a save_to_disk folder or a .txt/.jsonl/.parquet file"
        ) from exc
    return _documents(_split(loaded, split, spec), field, spec)


@contextlib.contextmanager
def _offline(config) -> Iterator[None]:
    """datasets in offline mode for one call (it reads the flag from its config module at call time)."""
    saved = config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved


def _split(loaded, split: str, source: str):
    if split not in loaded:
        raise InputError(f"{source} has no split {split!r} (splits: {', '.join(loaded)})")
    return loaded[split]


def _documents(dataset, field: str, source: str) -> list[str]:
    # with_format("arrow") applies any indices mapping (select, shuffle) that the raw table lacks.
    return string_column(list(dataset.column_names), lambda: dataset.with_format("arrow")[field], field, source)
