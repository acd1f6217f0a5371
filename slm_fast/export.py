"""Write a checkpoint whose blocks are windows of a source checkpoint, each merged into one block.

Composes the block-wise reader, the merge rules and the streaming writer: one output block is
computed and written at a time, so memory tracks a block or two whatever the model's size. Used by
`slm-fast merge`, by `slm-fast prune` once it has chosen its windows, and by the baselines.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

import slm_fast
from slm_fast.checkpoint.config_rewrite import rewrite_config
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.checkpoint.staging import (
    check_output_location,
    copy_tagalong_files,
    ensure_free_space,
    staged_folder,
)
from slm_fast.checkpoint.writer import ShardedWriter, TensorSpec
from slm_fast.merge import check_average_settings, check_rule, merge_window, settings_block
from slm_fast.windows import Window, output_blocks

PROVENANCE_NAME = "slm_fast.json"
DEFAULT_SHARD_BYTES = 2 * 10**9


@dataclass
class ExportResult:
    output: Path
    windows: list[Window]
    dropped: list[int]
    block_sources: list[Window]
    settings_sources: list[int]  # the source block whose per-layer settings each output block has
    rule: str
    source_blocks: int
    parameters_before: int
    parameters_after: int
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"wrote {self.output}: blocks {self.source_blocks} -> {len(self.block_sources)}, "
            f"parameters {self.parameters_before / 1e6:,.1f}M -> {self.parameters_after / 1e6:,.1f}M "
            f"({1 - self.parameters_after / self.parameters_before:.1%} fewer), rule {self.rule}, "
            f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s "
            f"({self.bytes_written / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)"
        )


def export_merged_checkpoint(
    source: str | Path | CheckpointReader,
    output: str | Path,
    windows: list[Window],
    *,
    dropped: list[int] | tuple[int, ...] = (),
    rule: str = "keep_high",
    average_settings: str = "low",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    provenance: dict | None = None,
    extra_files: dict[str, str] | None = None,
    block_transform: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> ExportResult:
    """Merge each window [lo, hi] of `source` into one block at lo, leave out the `dropped` blocks,
    renumber, and write to `output`.

    Each output block is written with the per-layer config settings of slm_fast.merge.settings_block
    (`average_settings` decides for the averaging rules). `dtype=None` keeps every tensor's dtype;
    otherwise floating tensors are stored in `dtype`.
    `provenance` adds fields to the slm_fast.json record; `extra_files` (name -> text) are written
    into the output folder too (e.g. the pruning report), inside the same atomic rename.
    `block_transform(position, tensors)` may replace an output block's tensors (same names, shapes and
    dtypes) before they are written, e.g. to fold a fitted compensation into them.
    """
    started = time.perf_counter()
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    output = Path(output)
    check_rule(rule)
    check_average_settings(average_settings)
    plan = output_blocks(windows, reader.num_blocks, dropped)
    settings = [settings_block(lo, hi, rule, average_settings) for lo, hi in plan]
    check_output_location(reader.folder, output, overwrite=overwrite)
    layout = _layout(reader, plan, dtype)
    writer_total = sum(torch.empty((), dtype=dt).element_size() * _numel(shape) for _, dt, shape in layout)
    ensure_free_space(output, writer_total)

    with staged_folder(output, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, layout, max_shard_bytes)
        try:
            for name, tensor in reader.read_tensors(_embedding_first(reader)).items():
                writer.write(name, _cast(tensor, dtype))
            bar = tqdm(plan, desc="writing blocks", unit="block", disable=not progress)
            for position, (lo, hi) in enumerate(bar):
                merged = merge_window(
                    reader.read_block, lo, hi, rule, is_projection=reader.arch.is_projection, out_dtype=dtype
                )
                if block_transform is not None:
                    merged = block_transform(position, merged)
                for name, tensor in merged.items():
                    writer.write(f"{reader.arch.block_prefix}{position}.{name}", tensor)
                del merged
            tail = [n for n in reader.other_names if n != reader.arch.embedding_name]
            for name, tensor in reader.read_tensors(tail).items():
                writer.write(name, _cast(tensor, dtype))
            files = [p.name for p in writer.finish()]
        except BaseException:
            writer.abort()
            raise
        config = rewrite_config(reader.config, reader.arch, settings, dtype=dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files += ["config.json", *copy_tagalong_files(reader.folder, staging)]
        result = ExportResult(
            output=output.resolve(),
            windows=[w for w in plan if w[0] != w[1]],
            dropped=sorted(dropped),
            block_sources=plan,
            settings_sources=settings,
            rule=rule,
            source_blocks=reader.num_blocks,
            parameters_before=sum(_numel(loc.entry.shape) for loc in reader.locations.values()),
            parameters_after=sum(_numel(shape) for _, _, shape in layout),
            bytes_written=writer.bytes_written,
            seconds=time.perf_counter() - started,
            files=files,
        )
        record = _provenance(reader, result, dtype, provenance)
        (staging / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
        result.files.append(PROVENANCE_NAME)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
            result.files.append(name)
    return result


def output_nbytes(reader: CheckpointReader, blocks_removed: int = 0, dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors written when `blocks_removed` blocks are merged away or dropped (every
    block of a supported architecture holds the same tensors), stored in `dtype` (None: as now)."""

    def nbytes(names: list[str]) -> int:
        total = 0
        for name in names:
            entry = reader.entry(name)
            itemsize = torch.empty((), dtype=dtype).element_size() if dtype and entry.dtype.is_floating_point else None
            total += entry.nbytes if itemsize is None else itemsize * _numel(entry.shape)
        return total

    block = nbytes([reader.full_name(0, n) for n in reader.block_tensor_names(0)])
    return nbytes(reader.other_names) + (reader.num_blocks - blocks_removed) * block


def _layout(reader: CheckpointReader, plan: list[Window], dtype: torch.dtype | None) -> list[TensorSpec]:
    """Embedding first, then the output blocks in order, then the other non-block tensors."""

    def spec(out_name: str, source_name: str) -> TensorSpec:
        entry = reader.entry(source_name)
        out_dtype = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
        return (out_name, out_dtype, entry.shape)

    layout = [spec(name, name) for name in _embedding_first(reader)]
    for position, (lo, _) in enumerate(plan):
        for name in reader.block_tensor_names(lo):
            layout.append(spec(f"{reader.arch.block_prefix}{position}.{name}", reader.full_name(lo, name)))
    layout += [spec(name, name) for name in reader.other_names if name != reader.arch.embedding_name]
    return layout


def _embedding_first(reader: CheckpointReader) -> list[str]:
    return [n for n in reader.other_names if n == reader.arch.embedding_name]


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _provenance(reader: CheckpointReader, result: ExportResult, dtype: torch.dtype | None, extra: dict | None):
    import safetensors
    import transformers

    record = {
        "tool": "slm_fast",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(reader.folder.resolve()),
        "source_blocks": reader.num_blocks,
        "output_blocks": len(result.block_sources),
        "windows": [list(w) for w in result.windows],
        "dropped": result.dropped,
        "block_sources": [list(w) for w in result.block_sources],
        "layer_settings_sources": result.settings_sources,
        "rule": result.rule,
        "dtype": "keep" if dtype is None else str(dtype).removeprefix("torch."),
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
        "versions": {
            "slm_fast": slm_fast.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
    }
    record.update(extra or {})
    return record
