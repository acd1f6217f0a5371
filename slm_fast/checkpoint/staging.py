"""Atomic output folders: everything is written into a hidden temporary folder next to the target and
renamed into place only when complete, so a failure never leaves a partial output behind and an
existing output is replaced only with --overwrite."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slm_fast.errors import CheckpointError

# Files of a source checkpoint that are rewritten, not copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
REWRITTEN_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_output_location(source: Path, output: Path, *, overwrite: bool) -> None:
    """Refuse outputs that would modify the source or silently replace an existing folder; staging
    folders that a dead process left next to `output` are named, and removed with `overwrite`."""
    source, output = source.resolve(), output.resolve()
    if output == source or source in output.parents:
        raise CheckpointError(f"output {output} is inside the source checkpoint {source}; choose another folder")
    if output in source.parents:
        raise CheckpointError(f"output {output} contains the source checkpoint {source}; choose another folder")
    for folder, pid in staging_folders(output):
        if _alive(pid):
            raise CheckpointError(f"{folder} is being written by process {pid}, which is still running")
        if not overwrite:
            raise CheckpointError(
                f"{folder} was left by process {pid}, which died while writing {output.name}; "
                "pass --overwrite to remove it"
            )
        shutil.rmtree(folder)
    if output.exists() and not overwrite:
        raise CheckpointError(f"output {output} already exists; pass --overwrite to replace it")


def staging_folders(output: Path) -> list[tuple[Path, int]]:
    """The staging (and retired-output) folders of `output` that `staged_folder` creates, with the id
    of the process that created each."""
    output = output.resolve()
    if not output.parent.is_dir():
        return []
    found = []
    for prefix in (f".{output.name}.partial-", f".{output.name}.replaced-"):
        for path in output.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name.removeprefix(prefix)
            if pid.isdigit() and path.is_dir():
                found.append((path, int(pid)))
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder with our own id is from a dead process whose id we now reuse
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_folder(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `output`; on success it replaces `output`, on any error it is
    removed and `output` is left as it was."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"output {output} appeared while writing; pass --overwrite to replace it")
        retired = output.parent / f".{output.name}.replaced-{os.getpid()}"
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired)
    else:
        staging.rename(output)


def copy_tagalong_files(source: Path, destination: Path) -> list[str]:
    """Copy tokenizer, generation-config and similar small files; weights, the index, config.json
    and model cards (which would describe the unpruned model) are not copied."""
    copied = []
    for path in tagalong_files(source):
        shutil.copy2(path, destination / path.name)
        copied.append(path.name)
    return copied


def tagalong_files(source: Path) -> list[Path]:
    """The files of `source` that `copy_tagalong_files` copies."""
    return [
        path
        for path in sorted(source.iterdir())
        if path.is_file()
        and path.suffix not in WEIGHT_SUFFIXES
        and path.name not in REWRITTEN_FILES
        and path.suffix.lower() != ".md"
    ]


@dataclass(frozen=True)
class SpaceNeed:
    """`nbytes` that a command will write under `folder` (which may not exist yet); `what` names them
    in the error."""

    what: str
    folder: Path
    nbytes: int


def ensure_free_space(output: Path, needed_bytes: int) -> None:
    """Fail early when the filesystem that will hold `output` (which may not exist yet, nor its
    parents) has less room than the output needs."""
    ensure_free_space_for([SpaceNeed("the output", output, needed_bytes)])


def ensure_free_space_for(needs: list[SpaceNeed]) -> None:
    """Fail early when any filesystem has less room than what will be written to it: needs whose
    folders share a filesystem share its free space, so they add up."""
    by_filesystem: dict[int, tuple[Path, list[SpaceNeed]]] = {}
    for need in needs:
        if need.nbytes <= 0:
            continue  # nothing written there: no reason to name it
        existing = need.folder.resolve()
        while not existing.exists():
            existing = existing.parent
        by_filesystem.setdefault(existing.stat().st_dev, (existing, []))[1].append(need)
    for existing, shared in by_filesystem.values():
        needed = sum(need.nbytes for need in shared)
        free = shutil.disk_usage(existing).free
        if free < needed:
            what = " and ".join(need.what for need in shared)
            raise CheckpointError(
                f"not enough disk space in {existing}: {what} need{'s' if len(shared) == 1 else ''} "
                f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
            )


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` (with its suffix, so writers that infer the format from it
    keep working), renamed to `path` when the block completes and removed when it fails: a reader never
    sees a half-written file."""
    path = Path(path)
    staged = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
