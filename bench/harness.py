"""Shared pieces of the benchmarks: synthetic checkpoints with realistic block sizes, the machine's
own disk throughput measured in the same run, page-cache eviction, and child processes whose peak
RSS is read from the OS (wait4), so that every figure comes with its baseline."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slm_fast.checkpoint.writer import ShardedWriter

GB = 1e9


@dataclass(frozen=True)
class BlockShape:
    """A Llama-style decoder block's dimensions."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self) -> dict[str, tuple[int, ...]]:
        kv = self.kv_heads * self.head_dim
        return {
            "input_layernorm.weight": (self.hidden,),
            "self_attn.q_proj.weight": (self.hidden, self.hidden),
            "self_attn.k_proj.weight": (kv, self.hidden),
            "self_attn.v_proj.weight": (kv, self.hidden),
            "self_attn.o_proj.weight": (self.hidden, self.hidden),
            "post_attention_layernorm.weight": (self.hidden,),
            "mlp.gate_proj.weight": (self.intermediate, self.hidden),
            "mlp.up_proj.weight": (self.intermediate, self.hidden),
            "mlp.down_proj.weight": (self.hidden, self.intermediate),
        }

    def config(self, blocks: int, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": blocks,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
        }


def write_synthetic_checkpoint(
    folder: Path, shape: BlockShape, blocks: int, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 * 10**9
) -> int:
    """A Llama checkpoint of `blocks` random blocks (weights ~ N(0, 0.02), norms ~ 1), written with the
    streaming writer one tensor at a time. Returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for block in range(blocks):
        tensors |= {f"model.layers.{block}.{name}": size for name, size in shape.block_tensors().items()}
    tensors |= {"model.norm.weight": (shape.hidden,), "lm_head.weight": (shape.vocab, shape.hidden)}
    writer = ShardedWriter(folder, [(name, dtype, size) for name, size in tensors.items()], shard_bytes)
    noise = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    for index, (name, size) in enumerate(tensors.items()):
        count = 1
        for dim in size:
            count *= dim
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=dtype)
        else:  # a rotated noise tile: cheap to make, different per tensor
            tiled = noise.roll(index * 7919).repeat(count // noise.numel() + 1)[:count]
            tensor = tiled.reshape(size)
        writer.write(name, tensor)
    writer.finish()
    config = shape.config(blocks, str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_bytes


def evict_from_page_cache(folder: Path) -> None:
    """Drop a folder's clean pages from the page cache so the next read comes from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_throughput(folder: Path, size_bytes: int = 2 * 10**9, chunk: int = 64 << 20) -> dict[str, float]:
    """Sequential write (with fsync) and cold read throughput of this machine's disk in GB/s."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk-probe.bin"
    block = os.urandom(chunk)
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for _ in range(size_bytes // chunk):
            handle.write(block)
        os.fsync(handle.fileno())
    write_seconds = time.perf_counter() - started
    evict_from_page_cache(folder)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(chunk):
            pass
    read_seconds = time.perf_counter() - started
    path.unlink()
    written = (size_bytes // chunk) * chunk
    return {"write_gb_s": written / GB / write_seconds, "read_gb_s": written / GB / read_seconds}


@dataclass
class ChildRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str


def run_child(args: list[str], env: dict[str, str] | None = None) -> ChildRun:
    """Run a command; its wall time and its own peak RSS (ru_maxrss of that child, from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(seconds, usage.ru_maxrss * 1024, process.returncode, output)


def run_checked(args: list[str], env: dict[str, str] | None = None) -> ChildRun:
    """run_child, stopping the benchmark with the command and its output when it fails."""
    run = run_child(args, env)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {run.returncode}):\n{run.output}")
    return run


def slm_fast_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "slm_fast", *args]


def median(values: list[float]) -> float:
    return statistics.median(values)


def explicit_configuration(flags: list[str]) -> list[str]:
    """`prune` flags with the method and the compensation named (SLM and none unless given; the
    reference preset fixes both): a benchmark's configuration means the same whatever prune's defaults."""
    if "--preset" in flags:
        return flags
    method = [] if "--method" in flags else ["--method", "slm"]
    compensate = [] if "--compensate" in flags else ["--compensate", "none"]
    return [*method, *flags, *compensate]
