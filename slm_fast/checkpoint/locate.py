"""Where a model argument points: a local checkpoint folder, or a Hugging Face Hub id
`org/name[@revision]` resolved in the local Hub cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub)
without any network access. A folder of that name takes precedence over the Hub id."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from slm_fast.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def resolve_model(source: str | Path) -> Path:
    """The checkpoint folder for `source`; CheckpointError naming it when it is neither an existing
    folder nor a Hub id cached locally."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint folder (a folder holding config.json and safetensors)")
    match = HUB_ID.fullmatch(str(source))
    if match is None:
        raise CheckpointError(f"{source}: no such checkpoint folder, and not a Hub id of the form org/name[@revision]")
    return _cached_snapshot(match["repo"], match["revision"])


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    shown = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise CheckpointError(
            f"{shown}: no such local folder, and the Hub model is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it first, e.g. `hf download {repo_id}"
            f"{'' if revision is None else f' --revision {revision}'}`, or give a checkpoint folder"
        ) from exc
    except HFValidationError as exc:
        raise CheckpointError(f"{shown}: not a valid Hub id ({exc})") from exc
    return Path(folder)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint; InputError naming the folder when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{folder}: cannot load a tokenizer ({exc})") from exc
