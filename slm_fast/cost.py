"""The cost model of a prune run to a block count (SLM's best-first search, SLEB's removal loop, the
one-pass baselines: ShortGPT, Gromov, last-n): what it will read, write and compute, and how long.

The counts come from replaying the run's own schedule without computing anything: the calibration
sweep, then every search step's sweep (`slm.sweep_schedule`), through the same block residency
policy (`PlannedResidency`) and the same tier placement (`TierLedger`) that the real run uses, so block
loads, bytes, forward tokens and tier peaks are those of the real run whenever the replayed steps are
the steps the run takes. Before a run the steps are not known: `predicted_steps` and
`predicted_sleb_steps` assume the search removes blocks from the top of the allowed range down (the
usual outcome on trained models; the departures, and so the cost, grow as windows sit lower). After a
run, the Replay takes the sweeps it really made. The logit criteria (kl, ppl; SLEB's ppl) also pass
every scored plan's tokens through the model's head (`head_tokens_per_plan`), which for a small model
with a large vocabulary is most of the work.

`--compensate linear` adds one bottom-up sweep after the search (`Replay.compensation`): each output
block from the lowest carrier to the highest built once, the tokens through it (a carrier's twice: the
fit and the pass on), and the float64 normal equations of each carrier (4 d^2 FLOPs per token).

Seconds follow from rates measured on this machine (`measure_rates`): reading and building one block,
one micro-batch through one block, writing and reading back one chunk of states on the spill disk, and
a float64 Gram product where the compensation accumulates its sums.
Reads that the background prefetch overlaps with compute are still counted in full, so the estimate
leans high when reading is not the bottleneck.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slm_fast.budget import MemoryLayout, block_param_bytes
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import TierLedger, combined_stats
from slm_fast.runtime.residency import PlannedResidency
from slm_fast.windows import Window, output_blocks


def flops_per_token(config: dict, seq_len: int, block_params: int) -> float:
    """Forward FLOPs of one token through one decoder block: the matmuls (2 per parameter) and the
    attention scores and weighted sum over the whole sequence (as non-fused kernels compute them)."""
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * block_params + 4 * seq_len * heads * head_dim


def head_flops_per_token(config: dict) -> float:
    """Forward FLOPs of one token through the head (the logits' matmul; the log-softmax is of lower order)."""
    return 2 * config["hidden_size"] * config["vocab_size"]


def head_tokens_per_plan(criterion: str, n_samples: int, seq_len: int) -> int:
    """Tokens one scored plan passes through the head under `criterion` (criteria.similarity_to_reference):
    kl takes the reference's and the candidate's logits of every token, ppl the candidate's of every token
    but the last of each sample; each call also probes one row for the vocabulary size. 0 for the rest."""
    if criterion == "kl":
        return 1 + 2 * n_samples * seq_len
    if criterion == "ppl":
        return 1 + n_samples * (seq_len - 1)
    return 0


@dataclass
class Counts:
    block_loads: int = 0
    bytes_read: int = 0
    token_forwards: int = 0
    head_tokens: int = 0  # tokens through the head (the logit criteria)
    state_bytes_written: int = 0  # to the disk tier
    state_bytes_read: int = 0  # from the disk tier
    peak_bytes: dict = field(default_factory=dict)  # per tier, hidden states
    sweeps: int = 0
    plans_scored: int = 0
    max_plan_state_bytes: int = 0  # the most plan-state bytes a sweep held at once
    carriers: int = 0  # compensation: spans fitted
    sums_flops: int = 0  # compensation: float64 FLOPs of the normal equations M^T M and M^T R


@dataclass(frozen=True)
class Rates:
    read_bytes_per_s: float  # checkpoint block read and build
    token_forwards_per_s: float  # tokens through one block
    disk_write_bytes_per_s: float  # state spill
    disk_read_bytes_per_s: float
    sums_flops_per_s: float  # float64 products of the compensation's normal equations, where they accumulate

    def to_json(self) -> dict:
        return asdict(self)


class Replay:
    """The run's schedule without tensors: calibration, then one sweep per call of `sweep`, each scored plan
    passing `head_tokens_per_plan` tokens through the head."""

    def __init__(
        self, reader: CheckpointReader, layout: MemoryLayout, n_samples: int, seq_len: int, dtype, rule,
        head_tokens_per_plan: int = 0,
    ):  # fmt: skip
        from slm_fast.slm import window_block

        self.reader, self.rule, self.seq_len = reader, rule, seq_len
        self.head_tokens_per_plan = head_tokens_per_plan
        self._spec = lambda window: window_block(window, rule, reader)
        self.counts = Counts()
        self.residency = PlannedResidency(layout.block_bytes)
        self.ledger = TierLedger(
            layout.state_device_bytes - layout.plan_device_bytes, layout.state_host_bytes - layout.plan_host_bytes
        )  # boundaries
        self.plan_ledger = TierLedger(layout.plan_device_bytes, layout.plan_host_bytes)
        config = reader.config.get("text_config", reader.config)
        rows, self.hidden_size = layout.micro_batch, config["hidden_size"]
        self.chunks = [min(rows, n_samples - start) for start in range(0, n_samples, rows)]
        self.chunk_bytes = [r * seq_len * self.hidden_size * dtype.itemsize for r in self.chunks]
        self.block_size = [block_param_bytes(reader, i, dtype) for i in range(reader.num_blocks)]
        self._calibrate()

    def _use(self, spec) -> None:
        if self.residency.access(spec.key):
            return
        self.counts.block_loads += len(spec.reads)
        self.counts.bytes_read += sum(self.reader.block_nbytes(i) for i in spec.reads)
        self.residency.admit(spec.key, self.block_size[spec.layer_index])

    def _forward(self, chunk: int) -> None:
        self.counts.token_forwards += self.chunks[chunk] * self.seq_len

    def _calibrate(self) -> None:
        from slm_fast.runtime.stream import BlockSpec

        num_blocks = self.reader.num_blocks
        self.residency.plan([("original", i) for i in range(num_blocks)])
        for c, size in enumerate(self.chunk_bytes):
            self.ledger.place(("boundary", 0, c), size)
        for block in range(num_blocks):
            self._use(BlockSpec.original(block))
            for c, size in enumerate(self.chunk_bytes):
                self.ledger.read(("boundary", block, c))
                self._forward(c)
                self.ledger.place(("boundary", block + 1, c), size)
        for c in range(len(self.chunks)):
            self.ledger.read(("boundary", num_blocks, c))

    def read_boundaries(self, boundaries: list[int]) -> None:
        """Whole boundary states read in this order (every chunk), as the one-pass baselines read them."""
        for boundary in boundaries:
            for c in range(len(self.chunks)):
                self.ledger.read(("boundary", boundary, c))

    def sweep(self, plans: list[tuple[Window, ...]]) -> None:
        from slm_fast.slm import Entry, SharedStates, sweep_schedule

        num_blocks = self.reader.num_blocks
        schedule = sweep_schedule(plans, num_blocks)
        self.residency.plan([self._spec(w).key for _, groups in schedule for w, _ in groups])
        shared = SharedStates(plans)
        for _, groups in schedule:
            for window, members in groups:
                self._use(self._spec(window))
                for source, target in shared.advance(members):
                    for c, size in enumerate(self.chunk_bytes):
                        if isinstance(source, Entry):
                            self.ledger.read(("boundary", source.boundary, c))
                        else:
                            self.plan_ledger.read(("state", source, c))
                        self._forward(c)
                        self.plan_ledger.place(("state", target, c), size)
                        held = sum(self.plan_ledger.used.values())
                        self.counts.max_plan_state_bytes = max(self.counts.max_plan_state_bytes, held)
                    self._release(shared.drop_if_unheld(source))
        for index in range(len(plans)):
            source = shared.source(index)
            for c in range(len(self.chunks)):
                if isinstance(source, Entry):
                    self.ledger.read(("boundary", source.boundary, c))
                else:
                    self.plan_ledger.read(("state", source, c))
            self._release(shared.finish(index))
        self.counts.sweeps += 1
        self.counts.plans_scored += len(plans)
        self.counts.head_tokens += len(plans) * self.head_tokens_per_plan

    def compensation(self, plan: list[Window]) -> Counts:
        """The counts of compensate.fit_linear over the output blocks `plan` after this replay's sweeps
        (the same residency), apart from the search's: block loads, bytes read, token forwards, spans
        fitted and the FLOPs of their sums. Its states' tier traffic is not modelled."""
        from slm_fast.compensate import carriers

        targets = carriers(plan, self.reader.num_blocks)
        search, self.counts = self.counts, Counts()
        if targets:
            specs = [self._spec(window) for window in plan[min(targets) : max(targets) + 1]]
            self.residency.plan([spec.key for spec in specs])
            for position, spec in enumerate(specs, start=min(targets)):
                self._use(spec)
                for chunk in range(len(self.chunks)):
                    self._forward(chunk)
                    if position in targets:
                        self._forward(chunk)
                if position in targets:
                    self.counts.carriers += 1
                    self.counts.sums_flops += 4 * self.hidden_size**2 * sum(self.chunks) * self.seq_len
        work, self.counts = self.counts, search
        return work

    def _release(self, state: int | None) -> None:
        if state is not None:
            for c in range(len(self.chunks)):
                self.plan_ledger.release(("state", state, c))

    def finish(self) -> Counts:
        stats = combined_stats(self.ledger, self.plan_ledger)
        self.counts.state_bytes_written = stats["disk_bytes_written"]
        self.counts.state_bytes_read = stats["disk_bytes_read"]
        self.counts.peak_bytes = stats["peak_bytes"]
        return self.counts


def predicted_steps(
    num_blocks: int, target_blocks: int, lowest: int, highest: int, placement: str = "top", seed: int = 0
):
    """The best-first steps under the model's assumption, as (plans the step scores, windows after the
    step): each step takes the growth whose changed window sits highest (`placement="top"`: windows grow
    from the top of [lowest, highest] down; "bottom" and "random" for other outcomes). Plans are those
    the search would score, minus those it scored in an earlier step (memoised)."""
    import random

    rng = random.Random(seed)
    from slm_fast.slm import _growths

    windows: list[Window] = []
    seen: set[tuple[Window, ...]] = set()
    for _ in range(target_blocks):
        growths = _growths(windows, lowest, highest)
        if not growths:
            break
        plans = [tuple(output_blocks(grown, num_blocks)) for grown, _ in growths]
        fresh = [p for p in dict.fromkeys(plans) if p not in seen]
        seen.update(plans)
        if placement == "top":
            windows = max(growths, key=lambda growth: growth[1])[0]
        elif placement == "bottom":
            windows = min(growths, key=lambda growth: growth[1])[0]
        else:
            windows = rng.choice(growths)[0]
        yield fresh, windows


def predicted_sweeps(
    num_blocks: int, target_blocks: int, lowest: int, highest: int, placement: str = "top", seed: int = 0
) -> list[list[tuple[Window, ...]]]:
    """The plans of each best-first sweep under the model's assumption (`predicted_steps`)."""
    return [plans for plans, _ in predicted_steps(num_blocks, target_blocks, lowest, highest, placement, seed)]


def predicted_sleb_steps(num_blocks: int, remove: int):
    """SLEB's steps (baselines.sleb_search) under the model's assumption, as (plans the step scores,
    blocks dropped after the step): each step scores the removal of every block but the first, the last
    and those already dropped, and drops the highest. No plan recurs, so none is memoised."""
    dropped: list[int] = []
    for _ in range(remove):
        candidates = [b for b in range(1, num_blocks - 1) if b not in dropped]
        if not candidates:
            break
        plans = [tuple(output_blocks([], num_blocks, [*dropped, b])) for b in candidates]
        dropped = [*dropped, max(candidates)]
        yield plans, dropped


def sharing_gain(plans_per_sweep: list[list[tuple[Window, ...]]], num_blocks: int) -> tuple[int, int]:
    """Block runs of these sweeps (summed over chunks' common factor) without and with shared states:
    each plan running every block from its departure, against one run per distinct history."""
    from slm_fast.slm import SharedStates, sweep_schedule

    alone = shared = 0
    for plans in plans_per_sweep:
        states = SharedStates(plans)
        for _, groups in sweep_schedule(plans, num_blocks):
            for _, members in groups:
                alone += len(members)
                shared += len(states.advance(members))
    return alone, shared


def measure_rates(
    reader: CheckpointReader, runner, layout: MemoryLayout, seq_len: int, spill_dir: Path | None
) -> Rates:
    """Time one block read and build, one micro-batch through it, and one state chunk to disk and back."""
    from safetensors.torch import load_file, save_file

    index = reader.num_blocks // 2
    tick = time.perf_counter()
    block = runner.parts.block(reader.read_block(index), index)
    read_s = time.perf_counter() - tick
    config = runner.parts.config
    rows, length = layout.micro_batch, seq_len
    params = block_param_bytes(reader, index, runner.dtype) // runner.dtype.itemsize
    if rows * seq_len * 2 * params > TIMING_FLOPS:  # a huge block: time fewer tokens, so the dry run stays quick
        rows, length = 1, max(16, min(seq_len, int(TIMING_FLOPS // (2 * params))))
    hidden = torch.randn(rows, length, config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(runner.device, runner.dtype)
    runner.apply(block, index, hidden[:1, : min(seq_len, 16)])  # warm-up
    forward_s = _median_seconds(lambda: runner.apply(block, index, hidden), runner.device)
    runner.token_forwards = 0
    state = hidden.cpu().contiguous()
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slm_fast-rate-", dir=spill_dir) as folder:
        paths = iter(Path(folder) / f"state-{i}.safetensors" for i in range(REPEATS))
        written = []

        def write() -> None:
            written.append(next(paths))
            save_file({"t": state}, written[-1])

        write_s = _median_seconds(write, None)
        reads = iter(written)
        disk_read_s = _median_seconds(lambda: load_file(next(reads)), None)
    nbytes = state.numel() * state.element_size()
    return Rates(
        read_bytes_per_s=reader.block_nbytes(index) / max(read_s, 1e-9),
        token_forwards_per_s=rows * length / max(forward_s, 1e-9),
        disk_write_bytes_per_s=nbytes / max(write_s, 1e-9),
        disk_read_bytes_per_s=nbytes / max(disk_read_s, 1e-9),
        sums_flops_per_s=_sums_rate(runner.device, config.hidden_size),
    )


def _sums_rate(device: torch.device, d: int) -> float:
    """FLOP/s of M^T M in float64 where compensate.fit_linear accumulates, timed on M [tokens, w] with
    w = min(d, 1024): a product that stays compute-bound like the fit's (pieces of up to
    compensate.TOKENS_PER_CHUNK tokens) and takes milliseconds; GEMM rates change little beyond."""
    from slm_fast.compensate import TOKENS_PER_CHUNK, sums_device

    where = sums_device(device, d, TOKENS_PER_CHUNK)
    width = min(d, 1024)
    tokens = max(16, min(TOKENS_PER_CHUNK, int(SUMS_TIMING_FLOPS // (2 * width * width))))
    m = torch.randn(tokens, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(where)
    m.T @ m  # warm-up
    return 2 * tokens * width * width / max(_median_seconds(lambda: m.T @ m, where), 1e-9)


REPEATS = 3
TIMING_FLOPS = 5e10  # at most this much compute per timed forward
SUMS_TIMING_FLOPS = 1e9  # per timed float64 product (a CPU does some 10-50 GFLOP/s)


def _median_seconds(work, device) -> float:
    times = []
    for _ in range(REPEATS):
        tick = time.perf_counter()
        work()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    return sorted(times)[len(times) // 2]


def summarize(counts: Counts, rates: Rates, reader: CheckpointReader, seq_len: int, dtype) -> dict:
    """The figures the dry run prints and the report records, with an estimated time in seconds."""
    config = reader.config.get("text_config", reader.config)
    params = block_param_bytes(reader, 0, dtype) // dtype.itemsize
    block_flops = flops_per_token(config, seq_len, params)
    head_flops = counts.head_tokens * head_flops_per_token(config)
    seconds = {
        "read": counts.bytes_read / rates.read_bytes_per_s,
        "compute": counts.token_forwards / rates.token_forwards_per_s,
        "head": head_flops / (rates.token_forwards_per_s * block_flops),  # at the blocks' FLOP rate
        "state_disk": counts.state_bytes_written / rates.disk_write_bytes_per_s
        + counts.state_bytes_read / rates.disk_read_bytes_per_s,
    }
    return {
        "block_loads": counts.block_loads,
        "bytes_read": counts.bytes_read,
        "state_bytes_written": counts.state_bytes_written,
        "state_bytes_read": counts.state_bytes_read,
        "forward_flops": counts.token_forwards * block_flops,
        "token_forwards": counts.token_forwards,
        "head_tokens": counts.head_tokens,
        "head_flops": head_flops,
        "peak_state_bytes": counts.peak_bytes,
        "max_plan_state_bytes": counts.max_plan_state_bytes,
        "sweeps": counts.sweeps,
        "plans_scored": counts.plans_scored,
        "seconds": sum(seconds.values()),
        "seconds_by_part": seconds,
    }


def summarize_compensation(work: Counts, rates: Rates) -> dict:
    """The compensation sweep's figures (`Replay.compensation`) with an estimated time in seconds."""
    seconds = {
        "read": work.bytes_read / rates.read_bytes_per_s,
        "compute": work.token_forwards / rates.token_forwards_per_s,
        "sums": work.sums_flops / rates.sums_flops_per_s,
    }
    return {
        "carriers": work.carriers,
        "block_loads": work.block_loads,
        "bytes_read": work.bytes_read,
        "token_forwards": work.token_forwards,
        "sums_flops": work.sums_flops,
        "seconds": sum(seconds.values()),
        "seconds_by_part": seconds,
    }


def describe(figures: dict, layout: MemoryLayout) -> str:
    gb = 1e9
    peak = figures["peak_state_bytes"]
    lines = [
        layout.describe(),
        f"search sweeps {figures['sweeps']} after the calibration sweep, plans scored {figures['plans_scored']}",
        f"block loads {figures['block_loads']:,}, checkpoint bytes read {figures['bytes_read'] / gb:.2f} GB",
        f"hidden states spilled: written {figures['state_bytes_written'] / gb:.2f} GB, read back "
        f"{figures['state_bytes_read'] / gb:.2f} GB; plan states at most {figures['max_plan_state_bytes'] / gb:.3f} GB",
        f"peak hidden states per tier: device {peak.get('device', 0) / gb:.3f} GB, "
        f"host {peak.get('host', 0) / gb:.3f} GB, disk {peak.get('disk', 0) / gb:.3f} GB",
        f"forward FLOPs {figures['forward_flops']:.3e}",
    ]
    parts = figures["seconds_by_part"]
    head = ""
    if figures["head_tokens"]:
        tokens, flops = figures["head_tokens"], figures["head_flops"]
        lines.append(f"head (the criterion's logits): {tokens:,} tokens, {flops:.3e} FLOPs")
        head = f", head {parts['head']:.1f} s"
    lines.append(
        f"estimated time {figures['seconds']:.1f} s (read {parts['read']:.1f} s, compute {parts['compute']:.1f} s"
        f"{head}, state disk {parts['state_disk']:.1f} s)"
    )
    if comp := figures.get("compensation"):
        lines += [
            f"compensation (on the assumed selection): {comp['carriers']} spans fitted, block loads "
            f"{comp['block_loads']:,}, bytes read {comp['bytes_read'] / gb:.2f} GB, float64 FLOPs "
            f"{comp['sums_flops']:.3e}; estimated "
            "{:.1f} s (read {read:.1f} s, compute {compute:.1f} s, sums {sums:.1f} s)".format(
                comp["seconds"], **comp["seconds_by_part"]
            ),
            f"estimated time with compensation {figures['seconds'] + comp['seconds']:.1f} s",
        ]
    return "\n".join(lines)


def within(predicted: float, measured: float) -> float:
    """predicted / measured (1.0 = exact); inf when nothing was measured but something predicted."""
    if measured == 0:
        return 1.0 if predicted == 0 else math.inf
    return predicted / measured
