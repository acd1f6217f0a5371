"""Models given as Hub ids `org/name[@revision]`, resolved in a Hugging Face cache laid out the way
huggingface_hub lays it out (blobs, snapshots of symlinks, refs), with no network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer

from slm_fast.checkpoint.locate import resolve_model
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.cli import main
from slm_fast.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put `folder`'s files into `cache` as the snapshot `commit` of model `repo_id`, `main` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = save_tiny_checkpoint(tmp_path / "tiny", "llama", num_layers=4)
    save_tiny_tokenizer(folder)
    cache = tmp_path / "hub"
    cache_model(cache, "tinyorg/tiny-llama", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder named tinyorg/...
    return cache


def test_hub_id_resolves_to_its_cached_snapshot(hub_cache):
    snapshot = hub_cache / "models--tinyorg--tiny-llama" / "snapshots" / COMMIT
    assert resolve_model("tinyorg/tiny-llama") == snapshot
    assert resolve_model(f"tinyorg/tiny-llama@{COMMIT}") == snapshot
    assert resolve_model("tinyorg/tiny-llama@main") == snapshot
    reader = CheckpointReader("tinyorg/tiny-llama")
    assert reader.num_blocks == 4 and reader.folder == snapshot


def test_uncached_hub_ids_are_named(hub_cache):
    with pytest.raises(CheckpointError, match=r"otherorg/model: .*not in the local Hugging Face cache.*hf download"):
        resolve_model("otherorg/model")
    with pytest.raises(CheckpointError, match=r"tinyorg/tiny-llama@v2: .*--revision v2"):
        resolve_model("tinyorg/tiny-llama@v2")
    with pytest.raises(CheckpointError, match="not a Hub id of the form org/name"):
        resolve_model("no-such-folder")


def test_a_local_folder_wins_over_a_hub_id(hub_cache, tmp_path):
    local = save_tiny_checkpoint(tmp_path / "tinyorg" / "tiny-llama", "llama", num_layers=2)
    assert resolve_model("tinyorg/tiny-llama") == Path("tinyorg/tiny-llama")
    assert CheckpointReader("tinyorg/tiny-llama").num_blocks == 2 and local.is_dir()


def test_commands_take_hub_ids(hub_cache, tmp_path, capsys):
    assert main(["merge", "tinyorg/tiny-llama", str(tmp_path / "merged"), "--windows", "1-2", "--no-progress"]) == 0
    assert CheckpointReader(tmp_path / "merged").num_blocks == 3
    assert main(["merge", "otherorg/model", str(tmp_path / "x"), "--windows", "1-2", "--no-progress"]) == 2
    assert "otherorg/model: no such local folder" in capsys.readouterr().err
    for command in (
        ["evaluate", "otherorg/model", "--ppl", "austen:emma"],
        ["heatmap", "otherorg/model", "--out", "h.png"],
    ):
        assert main(command) == 2
        assert "not in the local Hugging Face cache" in capsys.readouterr().err
