"""One rank of the distributed-prune tests (tests/test_prune_distributed.py), run as a script:

    python tests/prune_worker.py RANK WORLD INIT_FILE SOURCE OUT_ROOT

Joins a gloo group through a file:// rendezvous (as torchrun's ranks join theirs), runs `prune` for
every case of CASES into OUT_ROOT/<world>/<case> and saves what this rank's call returned (or the
error it raised) as OUT_ROOT/<world>/rank<RANK>.json.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import SLM

from slm_fast.errors import SlmFastError
from slm_fast.prune import PruneOptions, prune

# Every case runs n_samples=4 x seq_len=32 in micro-batches of 2 (two chunks in flight).
CASES = {
    "best_first": dict(remove=3),
    "sliding": dict(search="sliding", remove=2, speculate=2),
    "laco": dict(method="laco", threshold=0.3),
    "sleb": dict(method="sleb", remove=2),
    "shortgpt": dict(method="shortgpt", remove=2),
    "gromov": dict(method="gromov", remove=2),
    "last_n": dict(method="last-n", remove=2),
    "kl": dict(criterion="kl", remove=2),
    # the fit runs on rank 0 alone after the distributed search
    "sleb_compensated": dict(method="sleb", remove=2, compensate="linear"),
    # 1 MB: no rank holds its slice, so each runs block by block over the chunks (blocks read once per
    # sweep, not once per chunk), and the states spill to disk
    "streamed": dict(remove=3, memory_budget=10**6),
}
# Bad input: refused on every rank before any work. "resume_nothing" fails in rank 0's journal only.
BAD = {
    "too_many": dict(remove=9),
    "resume_nothing": dict(remove=2, resume=True),
}


def options(source: Path, **overrides) -> PruneOptions:
    base = dict(calib=str(source.parent / "calib.txt"), n_samples=4, seq_len=32, micro_batch=2, progress=False)
    return PruneOptions(**(SLM | base | overrides))


def main() -> None:
    rank, world, init_file, source, out_root = sys.argv[1:6]
    rank, world, source = int(rank), int(world), Path(source)
    out = Path(out_root) / str(world)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = {}
    for name, overrides in {**CASES, **BAD}.items():
        try:
            report = prune(source, out / name, options(source, **overrides))
            results[name] = {
                "windows": [list(w) for w in report.windows],
                "dropped": report.dropped,
                "similarity": report.similarity,
                "blocks_after": report.blocks_after,
            }
        except SlmFastError as exc:
            results[name] = {"error": str(exc)}
    try:  # the checkpoint is missing on rank 1's "host" only
        prune(source if rank != 1 else source.parent / "absent", out / "missing_on_rank_1", options(source, remove=2))
        results["missing_on_rank_1"] = {"error": None}
    except SlmFastError as exc:
        results["missing_on_rank_1"] = {"error": str(exc)}
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed_worker.py: gloo's threads can abort interpreter finalization


if __name__ == "__main__":
    main()
