"""`prune` over 2 and 3 gloo processes (a pipeline over blocks, slm_fast/parallel/) commits exactly the
windows of the one-process run with the same similarities; bad input fails every rank before work; a
rank killed mid-search fails the survivors with one clear message and `--resume` completes the run.

Tolerance. Both runs compute in float32 on the same chunks of samples (--micro-batch 2), each block
on the same inputs with the same weights; what may differ is how the BLAS blocks a product whose
batch holds other rows (the one-process sliding scan runs its speculative extents in one batch, the
pipeline each plan in the sweep's chunks). A dot product of length K then rounds differently by at
most K u |x||y| (u = 2^-24), so the final states differ relatively by at most about L K u after L
blocks, and a cosine of float64 copies by twice that: 2 L K u = 2 x 10 x 96 x 6e-8 = 1.1e-4 here
(K = the widest reduction, the MLP's 96). The logit criteria (kl) go through the head: a further 64-long
product, inside the same bound's order; they are compared with the same bound relative to |score| + 1.
In practice the scores agree bit for bit (tested: the same decisions).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import prune_worker as worker
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import SLM_FLAGS, save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus

from slm_fast.parallel.pipeline import Slices, search_work
from slm_fast.parallel.scorer import SweepProgram
from slm_fast.prune import REPORT_NAME, prune
from slm_fast.windows import output_blocks

WORKER = Path(__file__).with_name("prune_worker.py")
NUM_BLOCKS, WIDEST, U = 10, 96, 2.0**-24
TOLERANCE = 2 * NUM_BLOCKS * WIDEST * U
TIMEOUT_S = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(**extra) -> dict:
    path = os.pathsep.join([str(Path.cwd()), str(WORKER.parent)])
    return {**os.environ, "OMP_NUM_THREADS": "1", "SLM_FAST_THREADS": "1", "PYTHONPATH": path, **extra}


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return logs


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dprune")
    folder = save_tiny_checkpoint(root / "src", "llama", num_layers=NUM_BLOCKS, shard="150KB")
    save_tiny_tokenizer(folder)
    write_word_corpus(root / "calib.txt")
    return folder


@pytest.fixture(scope="module")
def single_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("single")


@pytest.fixture(scope="module")
def single(source, single_root) -> dict:
    """The one-process run of every case (outputs in single_root): its report."""
    root = single_root
    out = {}
    for name, overrides in worker.CASES.items():
        prune(source, root / name, worker.options(source, **overrides))
        out[name] = json.loads((root / name / REPORT_NAME).read_text())
    return out


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, source, tmp_path_factory) -> tuple[int, Path, list[dict]]:
    """Every case on `world` processes: (world, the outputs' folder, what each rank returned)."""
    world = request.param
    root = tmp_path_factory.mktemp(f"ranks{world}")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(root / "init"), str(source), str(root)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = _finish(procs)
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    out = root / str(world)
    return world, out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * (abs(b) + 1)


def _candidates(report: dict) -> list[tuple]:
    """Every scored candidate of the report, whatever the method: (lo, hi, similarity)."""
    for key in ("search", "sleb"):
        if key in report:
            return [(c["lo"], c["hi"], c["similarity"]) for c in report[key]["candidates"]]
    return []


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_pipeline_commits_the_one_process_windows(ranks, single, single_root, name):
    _, out, results = ranks
    want = single[name]
    got = json.loads((out / name / REPORT_NAME).read_text())
    assert got["windows"] == want["windows"] and got["dropped"] == want["dropped"]
    if want["similarity"] is None:
        assert got["similarity"] is None
    else:
        assert _close(got["similarity"], want["similarity"])
    mine, theirs = _candidates(got), _candidates(want)
    assert [c[:2] for c in mine] == [c[:2] for c in theirs]
    assert all(_close(a[2], b[2]) for a, b in zip(mine, theirs, strict=True))
    for key in ("block_influence", "angular_distance"):
        if key in want:
            assert all(_close(a, b) for a, b in zip(got[key], want[key], strict=True))
    if "threshold_search" in want:
        assert got["threshold_search"]["tried"] == want["threshold_search"]["tried"]
    if "compensation" in want:  # fitted on rank 0 alone as one process: the same fit and weights
        assert got["compensation"]["fitted_on"] == "rank 0 alone, recalibrated"
        for a, b in zip(got["compensation"]["spans"], want["compensation"]["spans"], strict=True):
            assert a == b | {"relative_error_after": a["relative_error_after"]}
            assert _close(a["relative_error_after"], b["relative_error_after"])
        _assert_same_weights(out / name, single_root / name)
    # every rank returned the same decisions
    for result in results:
        assert result[name]["windows"] == [list(w) for w in want["windows"]]
        assert result[name]["dropped"] == want["dropped"]
        assert result[name]["blocks_after"] == NUM_BLOCKS - sum(hi - lo for lo, hi in want["windows"]) - len(
            want["dropped"]
        )


def _assert_same_weights(a: Path, b: Path) -> None:
    """The two checkpoints hold the same tensors, to the scores' bound relative to each tensor's size."""
    mine, theirs = (
        {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
        for folder in (a, b)
    )
    assert theirs
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        scale = float(tensor.abs().max()) + 1
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=TOLERANCE * scale, msg=name)


def test_the_report_records_the_pipeline(ranks):
    world, out, _ = ranks
    report = json.loads((out / "best_first" / REPORT_NAME).read_text())
    pipeline = report["distributed"]
    assert pipeline["world_size"] == world and len(pipeline["ranks"]) == world
    slices = pipeline["slices"]
    assert slices[0][0] == 0 and slices[-1][1] == NUM_BLOCKS
    assert all(a[1] == b[0] and a[1] > a[0] for a, b in itertools.pairwise(slices))
    assert pipeline["chunks"] == 2
    for rank, stats in enumerate(pipeline["ranks"]):
        assert stats["blocks"] == slices[rank]
        assert 0 < stats["search"]["busy_fraction"] <= 1
        sent = stats["traffic"]["state_bytes"]
        # every rank but the last sends hidden states: 2 chunks of the 4 x 32 x 64 float32 calibration
        state_chunk = 2 * 32 * 64 * 4
        if rank < world - 1:
            assert stats["calibration"]["state_bytes_sent"] == 2 * state_chunk
            assert sent > 2 * state_chunk and sent % state_chunk == 0
        else:
            assert sent == 0
        # the slice's blocks are read once (calibration); the search reads only the extra blocks of
        # windows reaching past the slice, and builds merged blocks
        assert stats["blocks_loaded"] >= len(range(*slices[rank]))


def test_ranks_whose_slice_does_not_fit_run_block_by_block(ranks, single):
    _, out, _ = ranks
    pipeline = json.loads((out / "streamed" / REPORT_NAME).read_text())["distributed"]
    assert pipeline["chunk_major"] == [False] * len(pipeline["ranks"])
    loads = sum(r["blocks_loaded"] for r in pipeline["ranks"])
    # about the one-process run's block loads (each block once per sweep), not once per chunk
    assert loads <= single["streamed"]["blocks_loaded"] + 2 * len(pipeline["ranks"])


def test_bad_input_fails_every_rank_before_work(ranks):
    _, out, results = ranks
    for result in results:
        assert "can remove at most 8 of the 10 blocks" in result["too_many"]["error"]
        assert "holds no run to resume" in result["resume_nothing"]["error"]
    assert "(on rank 0)" in results[-1]["resume_nothing"]["error"]
    assert not (out / "resume_nothing").exists()
    # a failure on rank 1 alone stops rank 0 before it creates the work folder
    for rank, result in enumerate(results):
        assert "absent" in result["missing_on_rank_1"]["error"]
        assert ("(on rank 1)" in result["missing_on_rank_1"]["error"]) == (rank != 1)
    assert not (out / ".missing_on_rank_1.work").exists() and not (out / "missing_on_rank_1").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, args: list[str], timeout_s: int = 60) -> list[subprocess.Popen]:
    """`python -m slm_fast ARGS` on `world` ranks with the environment torchrun gives its workers."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "slm_fast", *args],
            env=_env(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                SLM_FAST_DIST_TIMEOUT_S=str(timeout_s),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


def test_a_killed_rank_fails_the_others_and_resume_completes(source, tmp_path):
    """Rank 1 of 3 is killed after the first sweep's scores reached the journal: ranks 0 and 2 stop
    with the lost-peer message (exit status 2) well inside the timeout; the same command with --resume
    ends with the windows of the one-process run."""
    out = tmp_path / "out"
    args = ["prune", str(source), str(out), *SLM_FLAGS, "--remove", "5", "--calib", str(source.parent / "calib.txt")]
    args += ["--samples", "8", "--seq-len", "64", "--micro-batch", "2", "--no-progress"]
    scores = tmp_path / ".out.work" / "scores.jsonl"
    procs = _launch(3, args)
    deadline = time.monotonic() + TIMEOUT_S
    while not (scores.exists() and scores.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the search never started"
        time.sleep(0.01)
    # freeze rank 0 so that the search is certainly unfinished when rank 1 dies
    os.kill(procs[0].pid, signal.SIGSTOP)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    os.kill(procs[0].pid, signal.SIGCONT)
    logs = _finish(procs)
    assert time.monotonic() - killed < 30
    for rank in (0, 2):
        assert procs[rank].returncode == 2, logs[rank]
        assert f"[rank {rank}] slm-fast prune: error: rank {rank} of 3 lost contact" in logs[rank]
        assert "--resume" in logs[rank] and "Traceback" not in logs[rank]
    assert not out.exists()
    assert 1 <= len(scores.read_text().splitlines()) < 50

    resumed = _launch(3, [*args, "--resume"])
    logs = _finish(resumed)
    assert all(p.returncode == 0 for p in resumed), logs
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["resumed"] is True
    alone = prune(source, tmp_path / "alone", worker.options(source, remove=5, n_samples=8, seq_len=64))
    assert report["windows"] == [list(w) for w in alone.windows]
    assert _close(report["similarity"], alone.similarity)
    summary = [line for line in logs[0].splitlines() if line.startswith("slm: pruned")]
    assert len(summary) == 1 and not any("slm: pruned" in log for log in logs[1:])


@pytest.mark.slow
def test_a_frozen_rank_is_given_up_after_the_timeout(source, tmp_path):
    """A peer that stops without closing its connections (SIGSTOP) is waited for until
    SLM_FAST_DIST_TIMEOUT_S (10 s here); then rank 0 fails with the lost-peer message, and leaving the
    process group does not hang on the frozen peer."""
    args = ["prune", str(source), str(tmp_path / "out"), "--remove", "5", "--calib", str(source.parent / "calib.txt")]
    args += ["--samples", "8", "--seq-len", "64", "--micro-batch", "2", "--no-progress"]
    scores = tmp_path / ".out.work" / "scores.jsonl"
    procs = _launch(2, args, timeout_s=10)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (scores.exists() and scores.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the search never started"
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        log = procs[0].communicate(timeout=120)[0]
        assert 10 <= time.monotonic() - frozen < 60
        assert procs[0].returncode == 2 and "rank 0 of 2 lost contact" in log and "Timed out" in log, log
    finally:
        procs[1].kill()
        _finish(procs)


def _torchrun_prune(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m slm_fast prune ARGS`, the command a user types."""
    run = subprocess.run(
        [*TORCHRUN, "-m", "slm_fast", "prune", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("slm: pruned") == 1  # rank 0's summary only
    return run


@pytest.mark.slow
def test_torchrun_command_line(source, tmp_path):
    """Without --micro-batch the pipeline runs 2 chunks per rank (here 4 of one sample each), the
    one-process run one chunk of 4: the same windows, similarities within the float32 bound."""
    args = ["--calib", str(source.parent / "calib.txt"), "--samples", "4", "--seq-len", "32"]
    _torchrun_prune([str(source), str(tmp_path / "two"), "--remove", "2", *args, "--no-progress"])
    alone = prune(source, tmp_path / "one", worker.options(source, remove=2, micro_batch=None))
    want = json.loads((tmp_path / "one" / REPORT_NAME).read_text())
    report = json.loads((tmp_path / "two" / REPORT_NAME).read_text())
    assert report["windows"] == [list(w) for w in alone.windows]
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["chunks"] == 4
    pairs = zip(_candidates(report), _candidates(want), strict=True)
    assert all(a[:2] == b[:2] and _close(a[2], b[2]) for a, b in pairs)


@pytest.mark.slow
def test_torchrun_prunes_smollm2_as_one_process(smollm2, tmp_path):
    """The issue's check: `torchrun --standalone --nproc-per-node 2 -m slm_fast prune SmolLM2 OUT --remove 2`
    commits the windows of the one-process run, with the same similarity of every candidate (SmolLM2:
    30 blocks, widest reduction the MLP's 1536: 2 x 30 x 1536 x 2^-24 = 5.5e-3, a loose bound; the runs
    agree bit for bit here although the pipeline runs 4 chunks of one sample and the one process one
    chunk of 4).
    A small calibration, the same for both, keeps it near a minute on 2 cores."""
    small = ["--samples", "4", "--seq-len", "64", "--no-progress"]
    _torchrun_prune([str(smollm2), str(tmp_path / "two"), "--remove", "2", *small])
    one = subprocess.run(
        [sys.executable, "-m", "slm_fast", "prune", str(smollm2), str(tmp_path / "one"), "--remove", "2", *small],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    want = json.loads((tmp_path / "one" / REPORT_NAME).read_text())
    got = json.loads((tmp_path / "two" / REPORT_NAME).read_text())
    assert got["windows"] == want["windows"]
    bound = 2 * 30 * 1536 * U
    pairs = zip(_candidates(got), _candidates(want), strict=True)
    assert all(a[:2] == b[:2] and abs(a[2] - b[2]) <= bound for a, b in pairs)
    assert len(got["distributed"]["slices"]) == 2


def test_slices_balance_the_search_work_within_each_ranks_memory():
    work = search_work(30)
    assert Slices.balanced(work, [100, 100]).bounds == ((0, 21), (21, 30))  # 231 vs 234 block runs
    assert Slices.balanced(work, [8, 100]).bounds == ((0, 8), (8, 30))  # rank 0 holds 8 blocks at most
    assert Slices.balanced(work, [100, 5]).bounds == ((0, 25), (25, 30))
    assert Slices.balanced(work, [10, 10]).bounds == ((0, 15), (15, 30))  # too small together: by memory
    assert Slices.balanced(search_work(4), [9] * 4).bounds == ((0, 1), (1, 2), (2, 3), (3, 4))
    for ranks in (2, 3, 5, 8):
        bounds = Slices.balanced(search_work(40), [100] * ranks).bounds
        assert bounds[0][0] == 0 and bounds[-1][1] == 40
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(bounds))
        loads = [sum(search_work(40)[start:stop]) for start, stop in bounds]
        # each cut lies within half a block's work of its cumulative target: every rank's load is
        # within one block's work (40 at most) of the even share
        assert all(abs(load - sum(search_work(40)) / ranks) <= 40 for load in loads)
    assert Slices.proportional(10, [1, 3]).bounds == ((0, 2), (2, 10))


def test_sweep_messages_only_flow_up_the_ranks():
    """Every state a rank needs comes from itself or a rank below (no rank waits on one above it: no
    deadlock), and what each rank expects from a sender is exactly what that sender sends it."""
    slices = Slices(((0, 3), (3, 7), (7, 10)))
    growths = [output_blocks(w, 10) for w in ([(0, 1)], [(2, 3)], [(2, 5)], [(6, 7)], [(3, 4), (7, 8)], [(1, 8)])]
    dropped = [output_blocks([], 10, d) for d in ([2], [6, 9], [0, 7], [8])]
    program = SweepProgram([tuple(p) for p in growths + dropped], slices)
    for move in program.moves:
        assert program.home(move.source) <= slices.owner(move.block)
    for rank in range(3):
        assert all(dst > rank for _, dst in program.sends(rank))
        for src, keys in program.incoming(rank, 2, [True, False, True]).items():
            names = [name for name, dst in program.sends(src) if dst == rank]
            if src == 1:  # block by block: each message over every chunk
                assert keys == [(*name, chunk) for name in names for chunk in range(2)]
            else:
                assert keys == [(*name, chunk) for chunk in range(2) for name in names]
