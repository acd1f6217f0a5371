"""How a prune run divides its memory budget.

Fixed costs come first: the model's non-block parts (embedding, head, final norm), the block being
computed and the one being prefetched, the activations of one micro-batch, the reference outputs and
one plan's final state being scored. What remains is shared by the hidden states (the calibration's
boundaries and the search's plan states) and resident blocks: states get what they need up to half
(more when blocks need less), blocks the rest. States that do not fit go to host memory (pinned) when
the device is a GPU, then to disk; on the CPU, the budget is host memory and the rest goes to disk.
Within the states' room the search's plan states come first (each is read and rewritten at every
block of a sweep, a boundary once per plan): with Llama-70B and 128 x 2048 calibration tokens this cuts
the modelled spill traffic several-fold (bench/bench_scale.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from slm_fast.checkpoint.reader import CheckpointReader

DEFAULT_FRACTION = {"cuda": 0.85, "cpu": 0.5}  # of free GPU memory / available RAM


@dataclass(frozen=True)
class MemoryLayout:
    budget_bytes: int
    budget_source: str  # "given", or where the default came from
    micro_batch: int  # samples per block call and per stored chunk
    fixed_bytes: int  # parts, two blocks, activations, reference, one final state
    state_device_bytes: int  # hidden states on the GPU (0 on the CPU)
    state_host_bytes: int  # hidden states in host memory
    block_bytes: int  # resident blocks
    plan_device_bytes: int = 0  # the search's plan states' first claim on state_device_bytes
    plan_host_bytes: int = 0  # ... and on state_host_bytes; the calibration's boundaries get the rest

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        gb = 1e9
        tiers = f"states {self.state_device_bytes / gb:.2f} GB device + {self.state_host_bytes / gb:.2f} GB host"
        short = (
            " (below the fixed part: nothing else is kept in memory)" if self.fixed_bytes > self.budget_bytes else ""
        )
        return (
            f"memory budget {self.budget_bytes / gb:.2f} GB ({self.budget_source}){short}: "
            f"fixed {self.fixed_bytes / gb:.2f} GB, "
            f"{tiers}, resident blocks {self.block_bytes / gb:.2f} GB, micro-batch {self.micro_batch} samples"
        )


def default_budget(device: torch.device) -> tuple[int, str]:
    """A budget sized from free GPU memory (CUDA) or available RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fraction = DEFAULT_FRACTION["cuda"]
        return int(free * fraction), f"{fraction:.0%} of the GPU's free {free / 1e9:.1f} GB"
    import psutil

    available = psutil.virtual_memory().available
    fraction = DEFAULT_FRACTION["cpu"]
    return int(available * fraction), f"{fraction:.0%} of the {available / 1e9:.1f} GB of RAM available"


def host_spill_budget() -> int:
    """Host memory (pinned) that a GPU run may use for states that do not fit on the device."""
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_FRACTION["cpu"])


def block_param_bytes(reader: CheckpointReader, block: int, dtype: torch.dtype) -> int:
    """Bytes of block `block`'s tensors in `dtype` (what it occupies once built)."""
    return sum(math.prod(reader.entry(reader.full_name(block, n)).shape) for n in reader.block_tensor_names(block)) * (
        dtype.itemsize
    )


def activation_bytes_per_sample(config: dict, seq_len: int, dtype: torch.dtype) -> int:
    """Peak working memory of one sequence through one decoder block (hidden copies, MLP
    intermediates, attention scores and probabilities in float32): an estimate for sizing micro-batches."""
    d, inter = config["hidden_size"], config.get("intermediate_size", 4 * config["hidden_size"])
    heads = config.get("num_attention_heads", 1)
    return seq_len * (8 * d + 3 * inter) * dtype.itemsize + 2 * heads * seq_len * seq_len * 4


def plan_memory(
    reader: CheckpointReader,
    n_samples: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    budget_bytes: int | None,
    *,
    plans: int | None = None,
    host_bytes: int | None = None,
) -> MemoryLayout:
    """Divide `budget_bytes` (None: the default for `device`) for a run on n_samples x seq_len tokens.
    `plans`: how many plan states a sweep holds at most (default: one per block); `host_bytes`: host
    memory for states that do not fit on a GPU (default: from this machine's available RAM)."""
    source = "given"
    if budget_bytes is None:
        budget_bytes, source = default_budget(device)
    config = reader.config.get("text_config", reader.config)
    num_blocks, d = reader.num_blocks, config["hidden_size"]
    state = n_samples * seq_len * d * dtype.itemsize
    block = max(block_param_bytes(reader, i, dtype) for i in range(num_blocks))
    per_sample = activation_bytes_per_sample(config, seq_len, dtype)
    micro_batch = max(1, min(n_samples, budget_bytes // 8 // per_sample))
    parts = sum(math.prod(reader.entry(n).shape) for n in reader.other_names) * dtype.itemsize
    fixed = parts + 2 * block + micro_batch * per_sample + 2 * state
    remaining = max(0, budget_bytes - fixed)
    states_needed = (num_blocks + 1 + (plans or num_blocks)) * state
    blocks_needed = num_blocks * block
    states = min(states_needed, max(remaining // 2, remaining - blocks_needed))
    on_gpu = device.type == "cuda"
    host = (host_bytes if host_bytes is not None else host_spill_budget()) if on_gpu else states
    # Plan states are read and rewritten at every block of a sweep, boundaries once per plan: plans
    # get the fast tiers first.
    plans_bytes = (plans or num_blocks) * state
    plan_device = min(plans_bytes, states) if on_gpu else 0
    plan_host = min(plans_bytes - plan_device, host)
    return MemoryLayout(
        budget_bytes=budget_bytes,
        budget_source=source,
        micro_batch=micro_batch,
        fixed_bytes=fixed,
        state_device_bytes=states if on_gpu else 0,
        state_host_bytes=host,
        block_bytes=remaining - states,
        plan_device_bytes=plan_device,
        plan_host_bytes=plan_host,
    )
