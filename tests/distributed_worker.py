"""One rank of the distributed-similarity tests (tests/test_similarity_distributed.py), run as a script:

    python tests/distributed_worker.py RANK WORLD INIT_FILE OUT_FILE SIZES

SIZES: comma-separated token shard sizes, one per rank. Joins a gloo group through a file:// rendezvous,
computes every case of `cases()` on its shard of the shared data and saves {case: result} to OUT_FILE,
where a result is the CKA/HSIC tensors or the text of the InputError the case raised.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from slm_fast import StreamingCKA, cka_matrix, hsic
from slm_fast.errors import InputError

WIDTHS = (6, 9, 4)
UPDATE_SIZES = (3, 0, 11)  # then the rest: several update() calls per rank, one of them empty


def data(n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Three layers of n tokens, widths 6, 9, 4, correlated through a shared latent, with an offset."""
    generator = torch.Generator().manual_seed(15)
    latent = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    out = []
    for a, width in enumerate(WIDTHS):
        mix = torch.randn(3, width, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, width, generator=generator, dtype=torch.float64)
        out.append((torch.tanh(latent @ mix) + 0.5 * (a + 1) * noise + 3.0).to(dtype))
    return out


# name -> (function, dtype, keyword arguments); the function is cka_matrix/hsic (both are recorded) or
# "stream" (StreamingCKA fed in UPDATE_SIZES chunks).
CASES = {
    "linear": ("matrix", torch.float64, {"kernel": "linear"}),
    "linear_unbiased": ("matrix", torch.float64, {"kernel": "linear", "unbiased": True}),
    "rbf_sigma": ("matrix", torch.float64, {"kernel": "rbf", "sigma": [2.0, 3.0, 2.5]}),
    "rbf_median_unbiased": ("matrix", torch.float64, {"kernel": "rbf", "unbiased": True, "sigma_scale": 0.8}),
    "rbf_median_sampled": ("matrix", torch.float64, {"kernel": "rbf", "median_pairs": 300, "seed": 3}),
    "rbf_pairs_tiles": ("matrix", torch.float64, {"kernel": "rbf", "pairs": [(0, 2)], "block_size": 32}),
    "rbf_float32": ("matrix", torch.float32, {"kernel": "rbf", "median_diagonal": True}),
    "linear_float32": ("matrix", torch.float32, {"kernel": "linear"}),
    "rbf_bfloat16": ("matrix", torch.bfloat16, {"kernel": "rbf", "sigma": 2.5}),
    "stream_linear_tokens": ("stream", torch.float64, {"kernel": "linear", "unbiased": True, "linear_state": "tokens"}),
    "stream_linear_auto": ("stream", torch.float64, {"kernel": "linear"}),
    "stream_linear_features": (
        "stream",
        torch.float64,
        {"kernel": "linear", "unbiased": True, "linear_state": "features", "pairs": [(0, 2), (1, 2)]},
    ),
    # rank 0 never leaves token state (no room for the feature state), the others switch: rank 0 follows
    # them at compute()
    "stream_linear_mixed": ("stream_mixed", torch.float64, {"kernel": "linear", "unbiased": True}),
    "stream_rbf_median": ("stream", torch.float64, {"kernel": "rbf", "sigma_tokens": 40}),
    # rank 0 passes no tokens (the others' tokens are the whole set)
    "rank_0_empty": ("rank_0_empty", torch.float64, {"kernel": "rbf", "unbiased": True}),
    # layer 1 is one value on every token; layer 2 is constant within each rank's shard only
    "constant_layers": ("constant", torch.float64, {"kernel": "linear", "sigma": None}),
    "stream_rbf_disk": ("stream", torch.float64, {"kernel": "rbf", "sigma": 2.5, "store": "disk"}),
}


def constant_layers(layers: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    """Layer 1 set to 5.0 everywhere, layer 2 to the index of the shard each token falls in."""
    out = [x.clone() for x in layers]
    out[1].fill_(5.0)
    for rank, (start, stop) in enumerate(itertools.pairwise([0, *itertools.accumulate(sizes)])):
        out[2][start:stop] = float(rank)
    return out


def run_case(kind: str, shard: list[torch.Tensor], options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    group = dist.group.WORLD
    if kind == "rank_0_empty":
        shard = [x[:0] if dist.get_rank() == 0 else x for x in shard]
        return cka_matrix(shard, process_group=group, **options), hsic(shard, process_group=group, **options)
    if kind == "constant":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # layer 1 is constant: a warning names it
            return cka_matrix(shard, process_group=group, **options), hsic(shard, process_group=group, **options)
    if kind == "matrix":
        return cka_matrix(shard, process_group=group, **options), hsic(shard, process_group=group, **options)
    if kind == "stream_mixed":
        options = {**options, "state_bytes": 0 if dist.get_rank() == 0 else 2**30}
    with StreamingCKA(len(shard), process_group=group, **options) as stream:
        n = shard[0].shape[0]
        cuts = [min(c, n) for c in (0, *itertools.accumulate(UPDATE_SIZES))] + [n]
        for start, stop in itertools.pairwise(cuts):
            stream.update([x[start:stop] for x in shard])
        if kind == "stream_mixed":
            assert stream.state == ("tokens" if dist.get_rank() == 0 else "features"), stream.state
        return stream.compute(), stream.compute_hsic()


def main() -> None:
    rank, world, init_file, out_file, sizes = sys.argv[1:6]
    rank, world = int(rank), int(world)
    sizes = [int(s) for s in sizes.split(",")]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    results: dict[str, object] = {}
    for name, (kind, dtype, options) in CASES.items():
        layers = data(sum(sizes), dtype)
        if kind == "constant":
            layers = constant_layers(layers, sizes)
        shard = [x[start:stop] for x in layers]
        results[name] = run_case(kind, shard, options)
    subgroup = dist.new_group([1, 2]) if world >= 3 else None  # every rank joins new_group
    if subgroup is not None and rank in (1, 2):
        shard = [x[start:stop] for x in data(sum(sizes))]
        results["subgroup_1_2"] = cka_matrix(shard, "rbf", unbiased=True, process_group=subgroup)
    bad = [x[start:stop].clone() for x in data(sum(sizes))]
    if rank == 1:
        bad[2][0, 1] = float("nan")
    try:
        cka_matrix(bad, "rbf", process_group=dist.group.WORLD)
        results["nan_on_rank_1"] = "no error"
    except InputError as exc:
        results["nan_on_rank_1"] = str(exc)
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold tensors whose release then
    # needs the GIL of a dying interpreter and aborts ("terminate called without an active exception",
    # SIGABRT; seen about once in five runs here; pytorch/pytorch PR 179291 describes it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
