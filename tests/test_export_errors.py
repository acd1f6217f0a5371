"""Bad input to `slm-fast merge`: a clear error naming the culprit, no partial output, source untouched."""

import errno
import hashlib
import os
import re
import types

import pytest
from tiny_models import save_tiny_checkpoint

from slm_fast.checkpoint import staging, writer
from slm_fast.cli import main
from slm_fast.errors import CheckpointError
from slm_fast.export import export_merged_checkpoint


@pytest.fixture
def source(tmp_path):
    return save_tiny_checkpoint(tmp_path / "src", "llama", num_layers=5, shard="60KB")


def fingerprint(folder):
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
    }


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out"))


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        ("3-1", "window 3-1 is reversed"),
        ("2-5", r"window 2-5 is out of range: blocks are 0\.\.4"),
        ("0-2,2-3", "windows 0-2 and 2-3 overlap"),
    ],
)
def test_bad_windows_via_cli(source, tmp_path, capsys, windows, message):
    before = fingerprint(source)
    status = main(["merge", str(source), str(tmp_path / "out"), "--windows", windows, "--no-progress"])
    assert status == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert fingerprint(source) == before


def test_output_inside_source(source):
    with pytest.raises(CheckpointError, match="is inside the source checkpoint"):
        export_merged_checkpoint(source, source / "pruned", [(1, 2)], progress=False)
    with pytest.raises(CheckpointError, match="is inside the source checkpoint"):
        export_merged_checkpoint(source, source, [(1, 2)], progress=False)
    with pytest.raises(CheckpointError, match="contains the source checkpoint"):
        export_merged_checkpoint(source, source.parent, [(1, 2)], overwrite=True, progress=False)
    assert not (source / "pruned").exists()


def test_existing_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        export_merged_checkpoint(source, out, [(1, 2)], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_merged_checkpoint(source, out, [(1, 2)], overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not leftovers(tmp_path)


def test_disk_full_during_write(source, tmp_path, monkeypatch):
    """ENOSPC half-way through the shards: error naming the shard, no partial output, source intact."""
    before = fingerprint(source)
    real_pwrite, calls = os.pwrite, []

    def failing_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", failing_pwrite)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: disk full while writing"):
        export_merged_checkpoint(source, tmp_path / "out", [(1, 3)], max_shard_bytes=50_000, progress=False)
    assert len(calls) > 6
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert fingerprint(source) == before


def test_disk_full_when_reserving(source, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_space)
    with pytest.raises(CheckpointError, match="not enough disk space to reserve"):
        export_merged_checkpoint(source, tmp_path / "out", [(1, 3)], progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_not_enough_free_space_up_front(source, tmp_path, monkeypatch):
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1000, used=0, free=1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*: the output needs 0\.00 GB, 0\.00 GB free"):
        export_merged_checkpoint(source, tmp_path / "out", [(1, 3)], progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_output_in_folders_that_do_not_exist_yet(source, tmp_path):
    result = export_merged_checkpoint(source, tmp_path / "new" / "deeper" / "out", [(1, 2)], progress=False)
    assert (result.output / "config.json").exists()
