"""One rank of tests/test_distributed_commands.py's checks of slm_fast.parallel.data_parallel, started
by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/data_parallel_worker.py OUT_DIR MODEL

Saves {check: outcome} to OUT_DIR/rank{RANK}.json, an outcome being the result or the error's text, and
the heat map of MODEL on one 12-token sample (so rank 1's share is empty) as "heatmap".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from slm_fast.errors import InputError
from slm_fast.parallel.data_parallel import check_same_input, gather_in_order, shard, sum_over_ranks, together
from slm_fast.parallel.launch import from_environment, join, leave


def outcome(check) -> object:
    try:
        return check()
    except InputError as exc:
        return f"InputError: {exc}"


def main() -> None:
    launch = from_environment()
    join(launch)
    results: dict[str, object] = {}

    def rank_1_fails() -> str:
        with together(launch):
            if launch.rank == 1:
                raise InputError("rank 1's own complaint")
        return "passed"

    results["together_rank_1_fails"] = outcome(rank_1_fails)
    results["together_all_pass"] = outcome(lambda: _passes(launch))
    same = torch.arange(6.0).reshape(2, 3)
    results["same_input"] = outcome(lambda: check_same_input(launch, "--calib x", same) or "passed")
    differs = same + (launch.rank == 1)
    results["different_input"] = outcome(lambda: check_same_input(launch, "--calib x", differs) or "passed")
    mine = shard(7, launch.rank, launch.world_size)
    results["gathered"] = gather_in_order([f"item {i}" for i in mine], launch)
    results["counters"] = sum_over_ranks({"a": launch.rank + 1, "b": 10}, launch)
    from slm_fast.heatmap import block_output_cka

    one_sample = torch.arange(3, 15).reshape(1, 12)
    heatmap = block_output_cka(sys.argv[2], one_sample, kernel="rbf", progress=False, process_group=dist.group.WORLD)
    results["heatmap"] = heatmap.matrix.tolist()
    Path(sys.argv[1], f"rank{launch.rank}.json").write_text(json.dumps(results))
    leave()
    sys.stdout.flush()
    os._exit(0)  # see distributed_worker.py: gloo's threads can abort interpreter finalization


def _passes(launch) -> str:
    with together(launch):
        pass
    return "passed"


if __name__ == "__main__":
    main()
