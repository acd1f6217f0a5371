"""Block-wise reading of a Hugging Face safetensors checkpoint folder.

Checkpoints that cannot be pruned correctly are refused when opened, naming the reason: quantized
ones (a `quantization_config`, or float8 tensors), `.bin`-only ones (with how to convert them), and
architectures outside the table.

Opening a checkpoint reads only `config.json`, the index and every shard's header; tensors are read
one block at a time through `safe_open` memory maps. The tensors returned are views of the map, so
pages are read on first touch and the mapping is released when the caller drops the block: peak
memory tracks the blocks a caller holds, never a shard or the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from slm_fast.checkpoint.arch import Architecture, architecture_for
from slm_fast.checkpoint.locate import resolve_model
from slm_fast.checkpoint.safetensors_format import ShardHeader, TensorEntry, read_header
from slm_fast.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
FLOAT8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


@dataclass(frozen=True)
class TensorLocation:
    shard: Path
    entry: TensorEntry


class CheckpointReader:
    """An opened checkpoint folder: config, architecture, tensor -> shard map, block grouping."""

    def __init__(self, folder: str | Path):
        """`folder`: a checkpoint folder, or a Hub id `org/name[@revision]` in the local cache."""
        self.folder = resolve_model(folder)
        self.config = _read_json(self.folder / "config.json")
        _refuse_quantization_config(self.config, self.folder / "config.json")
        self.arch: Architecture = architecture_for(self.config, source=str(self.folder / "config.json"))
        self.locations = _locate_tensors(self.folder)
        _refuse_float8(self.locations)
        self.block_names, self.other_names = self._group_by_block()
        self._check_block_count()

    # -- layout -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block_tensor_names(self, block: int) -> list[str]:
        """Names of block `block`'s tensors relative to the block, e.g. 'self_attn.q_proj.weight'."""
        self._check_block_index(block)
        return list(self.block_names[block])

    def full_name(self, block: int, name: str) -> str:
        return f"{self.arch.block_prefix}{block}.{name}"

    def entry(self, full_name: str) -> TensorEntry:
        return self.locations[full_name].entry

    def block_nbytes(self, block: int) -> int:
        return sum(self.entry(self.full_name(block, n)).nbytes for n in self.block_names[block])

    @property
    def total_nbytes(self) -> int:
        return sum(loc.entry.nbytes for loc in self.locations.values())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of most of the checkpoint's bytes (its storage dtype)."""
        totals: dict[torch.dtype, int] = {}
        for loc in self.locations.values():
            totals[loc.entry.dtype] = totals.get(loc.entry.dtype, 0) + loc.entry.nbytes
        return max(totals, key=totals.__getitem__)

    # -- reading ------------------------------------------------------------------------------------
    def read_block(self, block: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of one block (all, or only `names`), keyed by their names relative to the block."""
        self._check_block_index(block)
        wanted = self.block_names[block] if names is None else list(names)
        missing = [n for n in wanted if n not in self.block_names[block]]
        if missing:
            raise CheckpointError(f"{self.folder}: block {block} has no tensor(s) {missing}")
        full = self.read_tensors(self.full_name(block, n) for n in wanted)
        return {n: full[self.full_name(block, n)] for n in wanted}

    def read_tensors(self, full_names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read tensors by full name, opening each shard involved once for this call."""
        by_shard: dict[Path, list[str]] = {}
        for name in full_names:
            if name not in self.locations:
                raise CheckpointError(f"{self.folder}: no tensor named {name!r}")
            by_shard.setdefault(self.locations[name].shard, []).append(name)
        out = {}
        for shard, names in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in names:
                        out[name] = handle.get_tensor(name)
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises its own error types for unreadable files
                raise CheckpointError(f"{shard}: cannot read tensors {names[:3]}...: {exc}") from exc
        return out

    # -- validation helpers -------------------------------------------------------------------------
    def _group_by_block(self) -> tuple[list[list[str]], list[str]]:
        pattern = re.compile(re.escape(self.arch.block_prefix) + r"(\d+)\.(.+)")
        blocks: dict[int, list[str]] = {}
        others = []
        for name in self.locations:
            match = pattern.fullmatch(name)
            if match:
                blocks.setdefault(int(match.group(1)), []).append(match.group(2))
            else:
                others.append(name)
        count = max(blocks, default=-1) + 1
        absent = [i for i in range(count) if i not in blocks]
        if absent:
            raise CheckpointError(f"{self.folder}: the weights have no tensors for block(s) {absent}")
        return [sorted(blocks[i]) for i in range(count)], sorted(others)

    def _check_block_count(self) -> None:
        declared = self.config.get(self.arch.count_key)
        if declared != self.num_blocks:
            raise CheckpointError(
                f"{self.folder / 'config.json'}: {self.arch.count_key}={declared} but the weights hold "
                f"{self.num_blocks} blocks ({self.arch.block_prefix}0..{self.num_blocks - 1})"
            )

    def _check_block_index(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise CheckpointError(f"{self.folder}: block {block} out of range 0..{self.num_blocks - 1}")


def _refuse_quantization_config(config: dict, source: Path) -> None:
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    raise CheckpointError(
        f"{source}: the checkpoint is quantized (quantization_config, quant_method {method!r}); merging "
        "quantized weights (packed integers with per-group scales) is not supported: prune the unquantized "
        "(bf16/fp16/fp32) model, then quantize the pruned one"
    )


def _refuse_float8(locations: dict[str, TensorLocation]) -> None:
    for name, location in locations.items():
        if location.entry.dtype in FLOAT8_DTYPES:
            raise CheckpointError(
                f"{location.shard}: tensor {name!r} is {str(location.entry.dtype).removeprefix('torch.')} "
                "(an FP8-quantized checkpoint, whose scales live in other tensors); merging it is not supported: "
                "prune the bf16/fp16 model, then quantize the pruned one"
            )


def _read_json(path: Path) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _locate_tensors(folder: Path) -> dict[str, TensorLocation]:
    """Map every tensor to its shard, checking the index against the shards' own headers."""
    index_path = folder / INDEX_NAME
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
        shard_names = sorted(set(weight_map.values()))
    elif (folder / SINGLE_NAME).exists():
        weight_map = None
        shard_names = [SINGLE_NAME]
    elif any((folder / name).exists() for name in PICKLE_WEIGHTS):
        raise CheckpointError(
            f"{folder}: the weights are PyTorch pickles (pytorch_model*.bin), which slm_fast does not read "
            "(they cannot be memory-mapped safely). Convert them to safetensors once, e.g. `python -c "
            '"from transformers import AutoModelForCausalLM; '
            f"AutoModelForCausalLM.from_pretrained('{folder}', dtype='auto').save_pretrained('CONVERTED')\"` "
            "(loads the whole model in memory), then prune CONVERTED"
        )
    else:
        raise CheckpointError(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")

    headers: dict[str, ShardHeader] = {}
    for shard_name in shard_names:
        shard_path = folder / shard_name
        if not shard_path.exists():
            source = f" (named in {index_path.name})" if weight_map is not None else ""
            raise CheckpointError(f"{shard_path}: shard file is missing{source}")
        headers[shard_name] = read_header(shard_path)

    if weight_map is None:
        header = headers[SINGLE_NAME]
        return {name: TensorLocation(header.path, entry) for name, entry in header.entries.items()}
    locations = {}
    for name, shard_name in weight_map.items():
        header = headers[shard_name]
        if name not in header.entries:
            raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard_name}, which lacks it")
        locations[name] = TensorLocation(header.path, header.entries[name])
    return locations
