"""The on-paper model of slm_fast on several GPUs: Llama-3-70B and Llama-3.1-405B on 8 x H200 in one host
and on 2 hosts x 8 H200, for

- the prune search as a pipeline over blocks (the design of the `prune` distribution: each rank holds a
  contiguous slice of the blocks resident; a plan's hidden state crosses each slice boundary once per
  step; the original model's boundary states stay on the rank that owns the block they enter; the
  reference final states and the scoring are on the last rank): time per best-first step, bytes each
  rank sends per step over NVLink and over the inter-host network, memory per rank;
- the data-parallel `heatmap` (each rank runs its share of the samples, the CKA is token-parallel):
  bytes of the ring exchange per rank, and time.

What is computed, not assumed. The steps are the repo's own: `cost.predicted_sweeps` gives the plans of
every best-first step (25 % of the blocks removed, windows assumed to grow from the top down, the cost
model's assumption), `slm.sweep_schedule` and `slm.SharedStates` give which block each plan state runs
on and which plans share a state, so block runs, state transfers and merged windows that straddle two
slices are counted exactly for that schedule. Block sizes and FLOPs come from the real shapes
(`cost.flops_per_token`, `budget.activation_bytes_per_sample`). The ring exchange's bytes follow
`similarity/distributed.py`'s schedule; the formula is checked here against the bytes its `Traffic`
accounting counts in a real gloo run on this machine (`bench_distributed_cka.launch`, 2 and 3 processes):
the run fails if they differ by one byte.

What is assumed (nothing here ran on an H200; labelled ASSUMED in the output): the H200's dense bf16
peak 989 TFLOP/s at 50 % efficiency for decoder blocks (bench_scale.py's assumption), its FP32 (no tensor
cores) 67 TFLOP/s at 50 % for the CKA kernel sums (float32 products), 141 GB of HBM of which 85 % is
usable, NVLink 450 GB/s per direction per GPU, 400 Gb/s (50 GB/s) InfiniBand per GPU between hosts,
PCIe 5 x16 at 50 GB/s to pinned host memory, 5 GB/s disk per host with the page cache shared by the
host's ranks. The pipeline is modelled as: plans run plan-major through a rank's resident slice in
micro-batches of one sample, sends overlap compute, and a step takes max(busiest rank's compute +
fill/drain bubble of one sample through the other slices, busiest link's transfer time).

    .venv/bin/python bench/distributed_model.py --out bench/distributed_model.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import GB, BlockShape

from slm_fast.budget import activation_bytes_per_sample
from slm_fast.cost import flops_per_token, predicted_sweeps, sharing_gain
from slm_fast.parallel.data_parallel import shard
from slm_fast.slm import Entry, SharedStates, sweep_schedule

BF16 = 2
ASSUMED = {
    "bf16_flops": 989e12,  # H200 dense bf16 peak
    "fp32_flops": 67e12,  # H200 FP32 without tensor cores (the CKA kernel sums multiply in float32)
    "efficiency": 0.5,
    "hbm_bytes": 141e9,
    "usable_fraction": 0.85,
    "nvlink_bytes_per_s": 450e9,  # per GPU, per direction
    "network_bytes_per_s": 50e9,  # 400 Gb/s InfiniBand per GPU, between hosts
    "pcie_bytes_per_s": 50e9,  # to pinned host memory (spilled boundary states)
    "disk_bytes_per_s": 5e9,  # per host
}
MODELS = {
    "Llama-3-70B": (BlockShape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256), 80),
    "Llama-3.1-405B": (BlockShape(hidden=16384, intermediate=53248, heads=128, kv_heads=8, vocab=128256), 126),
}
CLUSTERS = {"8 x H200, 1 host": (8, 8), "2 hosts x 8 H200": (16, 8)}  # ranks, ranks per host
CALIBRATIONS = ((16, 512), (128, 2048))


@dataclass(frozen=True)
class Setup:
    model: str
    shape: BlockShape
    blocks: int
    ranks: int
    per_host: int
    samples: int
    seq_len: int
    slices: tuple[int, ...] | None = None  # blocks per rank; None: as even as the block count allows

    def slice_sizes(self) -> list[int]:
        if self.slices is not None:
            return list(self.slices)
        return [len(shard(self.blocks, rank, self.ranks)) for rank in range(self.ranks)]

    @property
    def block_params(self) -> int:
        return sum(math.prod(size) for size in self.shape.block_tensors().values())

    @property
    def block_bytes(self) -> int:
        return self.block_params * BF16

    @property
    def state_bytes(self) -> int:
        """One plan's hidden state: samples x seq_len x hidden, bf16."""
        return self.samples * self.seq_len * self.shape.hidden * BF16

    @property
    def flops_per_token(self) -> float:
        config = {"hidden_size": self.shape.hidden, "num_attention_heads": self.shape.heads}
        return flops_per_token(config, self.seq_len, self.block_params)

    def owners(self) -> list[int]:
        """The rank that holds each block: contiguous slices in rank order."""
        return [rank for rank, size in enumerate(self.slice_sizes()) for _ in range(size)]

    def host(self, rank: int) -> int:
        return rank // self.per_host


@dataclass
class Step:
    """One best-first step's counts under the pipeline."""

    plans: int
    runs: list[int]  # block runs (one plan state through one block) per rank
    sends: Counter  # (from rank, to rank) -> states sent
    straddling_windows: int  # merged windows whose blocks lie on two ranks: one block's weights sent
    entry_reads: list[int]  # original boundary states read per rank (plans entering there)


def step_counts(setup: Setup, plans: list[tuple]) -> Step:
    owner = setup.owners()
    last = setup.ranks - 1

    def boundary_rank(boundary: int) -> int:  # boundary b enters block b; the final one is on the last rank
        return owner[boundary] if boundary < setup.blocks else last

    shared = SharedStates(plans)
    where: dict[int, int] = {}  # state id -> rank holding it
    runs, entry_reads, sends = [0] * setup.ranks, [0] * setup.ranks, Counter()
    straddling, sent = set(), set()  # a state is sent to a rank once, however many plans use it there
    for block, groups in sweep_schedule(plans, setup.blocks):
        rank = owner[block]
        for window, members in groups:
            if owner[window[0]] != owner[window[-1]]:
                straddling.add(window)
            for source, target in shared.advance(members):
                if isinstance(source, Entry):
                    origin = boundary_rank(source.boundary)
                    entry_reads[origin] += 1
                else:
                    origin = where[source]
                if origin != rank and (source, rank) not in sent:
                    sent.add((source, rank))
                    sends[(origin, rank)] += 1
                where[target] = rank
                runs[rank] += 1
    finals = {shared.source(index) for index in range(len(plans))}
    for source in finals:
        origin = boundary_rank(source.boundary) if isinstance(source, Entry) else where[source]
        if isinstance(source, Entry):
            entry_reads[origin] += 1
        if origin != last and (source, last) not in sent:
            sends[(origin, last)] += 1
    return Step(len(plans), runs, sends, len(straddling), entry_reads)


def search_sweeps(setup: Setup) -> list[list[tuple]]:
    return predicted_sweeps(setup.blocks, setup.blocks // 4, 0, setup.blocks - 2)


def work_balanced(setup: Setup) -> Setup:
    """The same setup with slices sized by work: contiguous slices whose block runs over the whole
    search are as even as possible (the smallest largest load, by bisection over a greedy split), no
    slice holding more blocks than fit the usable HBM beside the embedding or head."""
    per_block = Setup(**{**setup.__dict__, "ranks": setup.blocks, "slices": (1,) * setup.blocks})
    loads = [0] * setup.blocks
    for plans in search_sweeps(setup):
        loads = [a + b for a, b in zip(loads, step_counts(per_block, plans).runs, strict=True)]
    table, in_flight, workspace = overheads(setup)
    usable = ASSUMED["hbm_bytes"] * ASSUMED["usable_fraction"]
    most = int((usable - table - in_flight - workspace) // setup.block_bytes)

    def split(capacity: int) -> list[int] | None:
        sizes, load = [0], 0
        for block_load in loads:
            if sizes[-1] and (load + block_load > capacity or sizes[-1] == most):
                sizes.append(0)
                load = 0
            sizes[-1] += 1
            load += block_load
        return sizes if len(sizes) <= setup.ranks else None

    low, high = max(loads), sum(loads)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if split(middle) else (middle + 1, high)
    sizes = split(low)
    sizes += [0] * (setup.ranks - len(sizes))
    return Setup(**{**setup.__dict__, "slices": tuple(sizes)})


def pipeline_row(setup: Setup) -> dict:
    sweeps = search_sweeps(setup)
    steps = [step_counts(setup, plans) for plans in sweeps]
    if sum(sum(step.runs) for step in steps) != sharing_gain(sweeps, setup.blocks)[1]:
        raise SystemExit("block runs differ from cost.sharing_gain's count of the same sweeps")
    rate = ASSUMED["bf16_flops"] * ASSUMED["efficiency"]
    tokens = setup.samples * setup.seq_len
    run_s = tokens * setup.flops_per_token / rate  # one plan state through one block
    slice_blocks = max(setup.slice_sizes())
    memory = rank_memory(setup)
    spilled_fraction = [m["spilled_boundaries_gb"] / max(m["boundaries_gb"], 1e-12) for m in memory]

    def step_seconds(step: Step) -> dict:
        compute = [runs * run_s for runs in step.runs]
        bubble = (setup.ranks - 1) * slice_blocks * setup.seq_len * setup.flops_per_token / rate
        nvlink, network = [0] * setup.ranks, [0] * setup.ranks
        for (origin, target), count in step.sends.items():
            if setup.host(origin) == setup.host(target):
                nvlink[origin] += count * setup.state_bytes
            else:
                network[origin] += count * setup.state_bytes
        weights = step.straddling_windows * setup.block_bytes  # upper bound: counted on the busiest link
        links = [
            nvlink[r] / ASSUMED["nvlink_bytes_per_s"] + network[r] / ASSUMED["network_bytes_per_s"]
            for r in range(setup.ranks)
        ]
        links = [t + weights / ASSUMED["nvlink_bytes_per_s"] for t in links]
        host_reads = [
            reads * setup.state_bytes * fraction / ASSUMED["pcie_bytes_per_s"]
            for reads, fraction in zip(step.entry_reads, spilled_fraction, strict=True)
        ]
        busiest = max(c + h for c, h in zip(compute, host_reads, strict=True)) + bubble
        total = max(busiest, max(links))
        return {
            "seconds": total,
            "compute_s": compute,
            "bubble_s": bubble,
            "link_s": max(links),
            "busy": sum(compute) / (setup.ranks * total),
            "nvlink_bytes": nvlink,
            "network_bytes": network,
            "weight_bytes": weights,
        }

    timed = [step_seconds(step) for step in steps]
    one_gpu = one_gpu_step_seconds(setup, steps[0], run_s)
    first = timed[0]
    return {
        "model": setup.model,
        "cluster": f"{setup.ranks} ranks, {setup.per_host} per host",
        "slices": "equal" if setup.slices is None else "by work: " + ",".join(map(str, setup.slices)),
        "ranks": setup.ranks,
        "hosts": math.ceil(setup.ranks / setup.per_host),
        "calibration": f"{setup.samples} x {setup.seq_len}",
        "steps": len(steps),
        "first_step_plans": steps[0].plans,
        "first_step_s": first["seconds"],
        "mean_step_s": sum(t["seconds"] for t in timed) / len(timed),
        "search_h": sum(t["seconds"] for t in timed) / 3600,
        "first_step_busy": first["busy"],
        "search_busy": sum(sum(t["compute_s"]) for t in timed) / (setup.ranks * sum(t["seconds"] for t in timed)),
        "first_step_link_s": first["link_s"],
        "first_step_bubble_s": first["bubble_s"],
        "first_step_nvlink_gb_per_rank_max": max(first["nvlink_bytes"]) / GB,
        "first_step_network_gb_per_rank_max": max(first["network_bytes"]) / GB,
        "first_step_sent_gb_total": (sum(first["nvlink_bytes"]) + sum(first["network_bytes"])) / GB,
        "first_step_straddling_weight_gb": first["weight_bytes"] / GB,
        "one_gpu_first_step_s": one_gpu,
        "memory": memory,
    }


def overheads(setup: Setup) -> tuple[int, int, int]:
    """Bytes beside the blocks: the embedding or head table (first and last rank), three one-sample plan
    states in flight, one sample's block workspace."""
    config = {"hidden_size": setup.shape.hidden, "intermediate_size": setup.shape.intermediate}
    config["num_attention_heads"] = setup.shape.heads
    workspace = activation_bytes_per_sample(config, setup.seq_len, torch.bfloat16)
    return setup.shape.vocab * setup.shape.hidden * BF16, 3 * setup.state_bytes // setup.samples, workspace


def rank_memory(setup: Setup) -> list[dict]:
    """GB per rank: its blocks, embedding (rank 0) or final norm and head (last rank), the original
    boundary states entering its blocks (plus the final and reference final-norm states on the last
    rank), three one-sample plan states in flight (receiving, computing, sending) and one sample's block
    workspace; boundary states that do not fit the usable HBM are spilled to pinned host memory.
    (Shared plan histories that diverge inside a slice keep their common state until both branches
    ran: more in-flight states, bounded by the boundary budget; not modelled.)"""
    usable = ASSUMED["hbm_bytes"] * ASSUMED["usable_fraction"]
    table, in_flight, workspace = overheads(setup)
    rows = []
    for rank in range(setup.ranks):
        blocks = setup.slice_sizes()[rank]
        weights = blocks * setup.block_bytes + (table if rank in (0, setup.ranks - 1) else 0)
        boundaries = (blocks + (2 if rank == setup.ranks - 1 else 0)) * setup.state_bytes
        fixed = weights + in_flight + workspace
        spilled = min(boundaries, max(0.0, fixed + boundaries - usable))
        rows.append(
            {
                "rank": rank,
                "blocks": blocks,
                "weights_gb": weights / GB,
                "boundaries_gb": boundaries / GB,
                "plan_states_gb": in_flight / GB,
                "workspace_gb": workspace / GB,
                "total_gb": (fixed + boundaries) / GB,
                "spilled_boundaries_gb": spilled / GB,
                "fits": fixed <= usable,
            }
        )
    return rows


def one_gpu_step_seconds(setup: Setup, step: Step, run_s: float) -> float:
    """The same step on one H200 with the one-process engine, by the same arithmetic: all block runs on
    one GPU, plus the blocks that do not stay resident read from disk once per sweep (states assumed to
    fit; bench_scale.py's cost model replays residency and spill exactly)."""
    usable = ASSUMED["hbm_bytes"] * ASSUMED["usable_fraction"]
    states = (setup.blocks + 2) * setup.state_bytes
    resident = max(0, min(setup.blocks, int((usable - states) // setup.block_bytes)))
    read = (setup.blocks - resident) * setup.block_bytes / ASSUMED["disk_bytes_per_s"]
    return sum(step.runs) * run_s + read


def ring_bytes(sizes: list[int], widths: list[int], itemsize: int) -> list[dict]:
    """Bytes each rank sends in one distributed cka_matrix (similarity/distributed.py's ring): at every
    step k = 1 .. W // 2 its whole token shard, and the float64 column sums of the shard it received."""
    world = len(sizes)
    out = []
    for rank in range(world):
        tokens = sum(sizes[rank] * sum(widths) * itemsize for k in range(1, world // 2 + 1) if sizes[rank])
        columns = sum(len(widths) * sizes[(rank - k) % world] * 8 for k in range(1, world // 2 + 1))
        out.append({"tokens": tokens, "column_sums": columns})
    return out


def check_ring_bytes(folder: Path) -> list[dict]:
    """Measured: the Traffic of real gloo runs of the ring (bench_distributed_cka's launcher) equals
    `ring_bytes`, for 2 and 3 processes and uneven shards."""
    import bench_distributed_cka as cka_bench

    checks = []
    for world, tokens, layers, width in ((2, 101, 3, 24), (3, 101, 4, 16)):
        args = argparse.Namespace(tokens=tokens, layers=layers, width=width, repeats=0, timeout=300)
        results = cka_bench.launch(args, "rbf", world, folder)
        sizes = [tokens * (r + 1) // world - tokens * r // world for r in range(world)]
        expected = ring_bytes(sizes, [width] * layers, 4)
        for rank, (result, formula) in enumerate(zip(results, expected, strict=True)):
            measured = {key: result["traffic"][key] for key in formula}
            if measured != formula:
                raise SystemExit(f"ring bytes differ from the model on rank {rank} of {world}: {measured} vs {formula}")
        checks.append({"world": world, "tokens": tokens, "layers": layers, "width": width, "per_rank": expected})
    return checks


def heatmap_row(setup: Setup) -> dict:
    """`torchrun ... heatmap`: every rank reads the model (through its host's page cache), runs its
    samples through every block, then the token-parallel CKA of all L block outputs (bf16)."""
    tokens = setup.samples * setup.seq_len
    sizes = [len(shard(setup.samples, r, setup.ranks)) * setup.seq_len for r in range(setup.ranks)]
    widths = [setup.shape.hidden] * setup.blocks
    traffic = ring_bytes(sizes, widths, BF16)
    per_rank = max(t["tokens"] + t["column_sums"] for t in traffic)
    crosses = setup.ranks > setup.per_host  # ring steps pair ranks on both hosts
    bandwidth = ASSUMED["network_bytes_per_s"] if crosses else ASSUMED["nvlink_bytes_per_s"]
    forward = setup.blocks * max(sizes) * setup.flops_per_token / (ASSUMED["bf16_flops"] * ASSUMED["efficiency"])
    # kernel sums: the Gram tiles of every layer (2 d flops per token pair) and the L x L products of
    # the tiles (2 L^2 per pair), over this rank's share of the n^2 / 2 pairs, float32
    pairs = tokens * tokens / 2 / setup.ranks
    cka_flops = pairs * (2 * setup.shape.hidden * setup.blocks + 2 * setup.blocks**2)
    cka = cka_flops / (ASSUMED["fp32_flops"] * ASSUMED["efficiency"])
    model_bytes = setup.blocks * setup.block_bytes + 2 * setup.shape.vocab * setup.shape.hidden * BF16
    read = model_bytes / ASSUMED["disk_bytes_per_s"]
    outputs = setup.blocks * max(sizes) * setup.shape.hidden * BF16
    return {
        "model": setup.model,
        "ranks": setup.ranks,
        "calibration": f"{setup.samples} x {setup.seq_len}",
        "ring_gb_per_rank": per_rank / GB,
        "ring_s": per_rank / bandwidth,
        "read_s": read,
        "forward_s": forward,
        "cka_s": cka,
        "outputs_gb_per_rank": outputs / GB,
        "total_s": read + forward + cka + per_rank / bandwidth,
    }


def markdown(pipeline: list[dict], heatmaps: list[dict], checks: list[dict]) -> str:
    lines = [
        "# slm_fast on several GPUs: the model on paper",
        "",
        "Generated by `bench/distributed_model.py` (its docstring states the method). Nothing here ran on",
        "an H200 or across hosts. **Computed** from the repo's own code: the plans of every best-first step,",
        "which block each plan state runs on and which plans share a state (`cost.predicted_sweeps`,",
        "`slm.sweep_schedule`, `slm.SharedStates`; 25 % of the blocks removed, windows growing from the top",
        "down), block sizes and FLOPs of the real shapes. **Measured on this machine**: the bytes of the",
        "token-parallel CKA ring (`similarity/distributed.py`'s `Traffic`, gloo) equal the formula used",
        "below, checked to the byte on " + ", ".join(f"{c['world']} processes" for c in checks) + ".",
        "**Assumed** (not measured):",
        "",
    ]
    lines += [f"- {name}: {value:g}" for name, value in ASSUMED.items()]
    lines += [
        "",
        "## Prune search, pipeline over blocks",
        "",
        "Contiguous block slices per rank, weights resident; a plan state (samples x seq_len x hidden, bf16)",
        "is sent when the next block it runs is on another rank; the original boundary states stay where",
        "they enter; scores on the last rank. Step time = max(busiest rank's compute + spilled-state reads",
        "+ one-sample fill/drain bubble, busiest link); busy = all ranks' compute / (ranks x step time).",
        "The one-GPU column is the same step on one H200 by the same arithmetic (blocks beyond HBM re-read",
        "from a 5 GB/s disk every step; states assumed to fit, so it leans low for 128 x 2048).",
        "With equal slices the ranks are about half busy: the upper ranks run most blocks (every plan runs",
        "from its departure to the top). The rows 'by work' size the slices so that each rank's block runs",
        "over the whole search are as even as contiguous slices allow (at most the blocks that fit its HBM",
        "beside the head and working memory); the work moves between steps as windows grow, so a static",
        "split gains on the mean step and loses on the first.",
        "Fits: weights, in-flight states and workspace within 85 % of HBM on every rank (boundary states",
        "beyond that are spilled to host memory and read back over PCIe when plans enter there).",
        "",
        "| model | GPUs | calibration | slices (blocks per rank) | step 1 plans | step 1 s | mean step s | "
        "search h (all steps) | busy (search) | "
        "1 x H200 step 1 s | sent GB / step (all ranks) | max NVLink GB / rank | max network GB / rank | "
        "straddling-window weights GB | memory / rank GB (max) | spilled to host GB / rank | fits |",
        "|" + "---|" * 17,
    ]
    for row in pipeline:
        worst = max(row["memory"], key=lambda m: m["total_gb"])
        lines.append(
            f"| {row['model']} | {row['ranks']} ({row['hosts']} host{'s' if row['hosts'] > 1 else ''}) | "
            f"{row['calibration']} | {row['slices']} | {row['first_step_plans']} | {row['first_step_s']:.2f} | "
            f"{row['mean_step_s']:.2f} | {row['search_h']:.3f} | {row['search_busy']:.0%} | "
            f"{row['one_gpu_first_step_s']:.1f} | {row['first_step_sent_gb_total']:.1f} | "
            f"{row['first_step_nvlink_gb_per_rank_max']:.2f} | {row['first_step_network_gb_per_rank_max']:.2f} | "
            f"{row['first_step_straddling_weight_gb']:.1f} | {worst['total_gb']:.1f} "
            f"({worst['weights_gb']:.1f} weights + {worst['boundaries_gb']:.1f} boundaries + "
            f"{worst['plan_states_gb'] + worst['workspace_gb']:.1f} work) | "
            f"{max(m['spilled_boundaries_gb'] for m in row['memory']):.1f} | "
            f"{'yes' if all(m['fits'] for m in row['memory']) else 'no'} |"
        )
    lines += [
        "",
        "## Heatmap, data-parallel with token-parallel CKA",
        "",
        "Every rank reads the whole model (once per host through the page cache: the read column), runs its",
        "samples through every block, then sends its block outputs of all L blocks around the ring",
        "(each rank sends floor(W/2) times its shard: about half of all tokens, whatever W); the ring time",
        "takes the inter-host rate for every byte on 2 hosts (an upper bound). A rank holds its block outputs",
        "(column below) and one received shard of the same size: past `--memory-budget` they spill to disk.",
        "",
        "| model | GPUs | calibration | ring GB sent / rank | ring s | model read s | forward s | CKA s | "
        "block outputs GB / rank | total s |",
        "|" + "---|" * 10,
    ]
    for row in heatmaps:
        lines.append(
            f"| {row['model']} | {row['ranks']} | {row['calibration']} | {row['ring_gb_per_rank']:.2f} | "
            f"{row['ring_s']:.3f} | {row['read_s']:.0f} | {row['forward_s']:.2f} | {row['cka_s']:.2f} | "
            f"{row['outputs_gb_per_rank']:.1f} | {row['total_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("distributed_model.md"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-ring-check", action="store_true", help="do not run the gloo ring check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checks = [] if args.skip_ring_check else check_ring_bytes(Path(folder))
    pipeline, heatmaps = [], []
    for model, (shape, blocks) in MODELS.items():
        for ranks, per_host in CLUSTERS.values():
            for samples, seq_len in CALIBRATIONS:
                setup = Setup(model, shape, blocks, ranks, per_host, samples, seq_len)
                heatmaps.append(heatmap_row(setup))
                for variant in (setup, work_balanced(setup)):
                    pipeline.append(pipeline_row(variant))
                    print(json.dumps({k: v for k, v in pipeline[-1].items() if k != "memory"}), flush=True)
    args.out.write_text(markdown(pipeline, heatmaps, checks))
    if args.json:
        args.json.write_text(json.dumps({"assumed": ASSUMED, "ring_checks": checks, "pipeline": pipeline}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
