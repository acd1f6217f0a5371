"""`slm-fast heatmap` and `slm-fast evaluate` under torchrun (gloo, 2-3 CPU processes): the numbers equal
the one-process run, shares of samples, windows and documents uneven; bad input fails every rank before
any work; the data-parallel helpers on two processes.

Tolerances. heatmap: the tiny model is float64, so every block output and every CKA product is float64
in both runs; they differ only in how samples are batched (a 2-sample vs a 5-sample GEMM) and how the
float64 kernel sums are grouped over the ranks: relative errors of a few hundred ulps of the centring
terms, far below the 1e-10 asserted. evaluate: perplexity windows are scored in the very batches one
process forms, the per-window sums are exchanged exactly (each window's value plus zeros) and summed in
window order, so the perplexity is bit-equal. Task documents are split by the harness (document r + iW
on rank r), so requests are batched differently: log-likelihoods of the float32 model differ by a
relative 1e-6 or so (the bound test_harness_eval.py uses against the harness's own model, 1e-5, is
asserted on perplexity-type metrics); accuracies are comparisons of those values far from ties, equal,
and their means and standard errors come from the same 0/1 lists in the same order, equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_models import save_text_model
from test_harness_eval import first_rows
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus

from slm_fast.cli import main
from slm_fast.evaluation.harness_lm import documents_in_order
from slm_fast.evaluation.local_tasks import LOCAL_TASKS
from slm_fast.heatmap import block_output_cka
from slm_fast.parallel.data_parallel import shard

TIMEOUT_S = 300
TESTS = Path(__file__).parent


def torchrun(processes: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node N ARGV` with one thread a process."""
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "SLM_FAST_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(TESTS)]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *argv]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny64"), "llama", num_layers=4, dtype=torch.float64)
    save_tiny_tokenizer(folder)
    return folder, write_word_corpus(folder.parent / "calib.txt")


def test_shards_are_contiguous_and_balanced() -> None:
    assert [shard(7, r, 3) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(shard(2, r, 3)) for r in range(3)] == [1, 1, 0]


def test_documents_return_to_their_one_process_order() -> None:
    # 5 documents over 2 ranks: rank 0 holds 0, 2, 4 and rank 1 holds 1, 3
    per_rank = [{"t": {("acc", "none"): [0, 2, 4]}}, {"t": {("acc", "none"): [1, 3]}}]
    assert documents_in_order(per_rank) == {"t": {("acc", "none"): [0, 1, 2, 3, 4]}}
    with pytest.raises(ValueError, match="not a strided split"):
        documents_in_order([[0, 2], [1, 3, 5]])


def test_data_parallel_helpers_on_two_processes(tiny64: tuple[Path, Path], tmp_path: Path) -> None:
    run = torchrun(2, [str(TESTS / "data_parallel_worker.py"), str(tmp_path), str(tiny64[0])], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["together_rank_1_fails"] == "InputError: rank 1's own complaint"
    assert ranks[0]["together_rank_1_fails"] == "InputError: rank 1's own complaint (on rank 1)"
    for result in ranks:
        assert result["together_all_pass"] == result["same_input"] == "passed"
        assert result["different_input"].startswith("InputError: --calib x: rank(s) [1] built different data")
        assert result["gathered"] == [f"item {i}" for i in range(7)]
        assert result["counters"] == {"a": 3, "b": 20}
    # one sample on two ranks: rank 1's share is empty; the matrix is still one process's
    alone = block_output_cka(tiny64[0], torch.arange(3, 15).reshape(1, 12), kernel="rbf", progress=False)
    for result in ranks:
        torch.testing.assert_close(
            torch.tensor(result["heatmap"], dtype=torch.float64), alone.matrix, rtol=0, atol=1e-10
        )


def test_heatmap_on_three_processes_equals_one_process(tiny64: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    folder, calib = tiny64
    common = [str(folder), "--kernel", "rbf", "--calib", str(calib), "--samples", "5", "--seq-len", "12"]
    assert main(["heatmap", *common, "--out", str(tmp_path / "one.png"), "--no-progress"]) == 0
    capsys.readouterr()
    run = torchrun(3, ["-m", "slm_fast", "heatmap", *common, "--out", str(tmp_path / "three.png")], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote") == 1 and "4 blocks" in run.stdout and "on 3 processes" in run.stdout
    one, three = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "three"))
    assert three["tokens"] == one["tokens"] == 60 and three["processes"] == 3  # samples 2 + 2 + 1
    torch.testing.assert_close(torch.tensor(three["cka"]), torch.tensor(one["cka"]), rtol=0, atol=1e-10)
    assert (tmp_path / "three.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.png", "three.json", "three.png"]


def test_heatmap_bad_input_fails_on_every_rank(tiny64: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = tiny64
    argv = ["-m", "slm_fast", "heatmap", str(folder), "--out", str(tmp_path / "h.png"), "--calib", "missing.txt"]
    run = torchrun(2, argv, tmp_path)
    assert run.returncode != 0
    for rank in range(2):
        assert f"[rank {rank}] slm-fast heatmap: error:" in run.stderr and "missing.txt" in run.stderr
    assert "/slm_fast/" not in run.stderr and list(tmp_path.iterdir()) == []  # no worker traceback, no file


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [str(row) for name in LOCAL_TASKS for row in first_rows(name, 30)]
    return save_text_model(tmp_path_factory.mktemp("text_model"), texts, num_layers=3)


def test_evaluate_on_two_processes_equals_one_process(text_model: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(row["passage"] for row in first_rows("boolq", 40)) + "\n")
    common = [str(text_model), "--ppl", str(corpus), "--seq-len", "48", "--max-windows", "7"]
    common += ["--batch-tokens", "96", "--tasks", "arc_easy,winogrande", "--limit", "5", "--no-progress"]
    assert main(["evaluate", *common, "--json", str(tmp_path / "one.json")]) == 0  # 4 batches of 2, 2, 2, 1
    capsys.readouterr()
    run = torchrun(2, ["-m", "slm_fast", "evaluate", *common, "--json", str(tmp_path / "two.json")], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("wrote") == 1 and "summed over 2 processes" in run.stdout
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two["perplexity"] == one["perplexity"]  # bit-equal: see the module docstring
    assert one["perplexity"][str(corpus)]["windows"] == 7
    for task in ("arc_easy", "winogrande"):
        mine, theirs = two["zero_shot"]["tasks"][task], one["zero_shot"]["tasks"][task]
        assert mine["documents"] == theirs["documents"] == 5  # 3 + 2 documents
        assert mine["metrics"] == theirs["metrics"] and mine["metrics_stderr"] == theirs["metrics_stderr"]
    assert two["zero_shot"]["average"] == one["zero_shot"]["average"]
    assert two["run"]["processes"] == 2 and two["run"]["requests"] >= one["run"]["requests"]  # the harness pads


def test_evaluate_a_check_failing_on_rank_0_only_stops_every_rank(text_model: Path, tmp_path: Path) -> None:
    """--json is written by rank 0 alone, so only rank 0 checks its folder: rank 1 must not go on."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(row["passage"] for row in first_rows("boolq", 40)) + "\n")
    argv = ["-m", "slm_fast", "evaluate", str(text_model), "--ppl", str(corpus), "--json", str(tmp_path / "no/r.json")]
    run = torchrun(2, argv, tmp_path)
    assert run.returncode != 0
    assert "[rank 0] slm-fast evaluate: error: --json" in run.stderr
    assert "[rank 1] slm-fast evaluate: error: --json" in run.stderr and "(on rank 0)" in run.stderr


@pytest.mark.slow
def test_smollm2_heatmap_and_perplexity_on_two_processes(smollm2: Path, tmp_path: Path, capsys) -> None:
    """The real model (float32): the heat map on 2 processes (3 + 2 samples) equals one process's to
    1e-5 (block outputs of other batch shapes differ by float32 rounding, ~1e-6 relative, and the
    float32 kernel sums by the bound of test_similarity_distributed.py); perplexity bit for bit."""
    heat = [str(smollm2), "--calib", "austen:emma", "--samples", "5", "--seq-len", "64", "--no-progress"]
    ppl = [str(smollm2), "--ppl", "austen:emma", "--seq-len", "128", "--max-windows", "5", "--batch-tokens", "256"]
    assert main(["heatmap", *heat, "--out", str(tmp_path / "one.png")]) == 0
    assert main(["evaluate", *ppl, "--json", str(tmp_path / "one_ppl.json"), "--no-progress"]) == 0
    capsys.readouterr()
    for argv in (["heatmap", *heat, "--out", str(tmp_path / "two.png")], ["evaluate", *ppl, "--json", "two_ppl.json"]):
        run = torchrun(2, ["-m", "slm_fast", *argv], tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    torch.testing.assert_close(torch.tensor(two["cka"]), torch.tensor(one["cka"]), rtol=0, atol=1e-5)
    one, two = (json.loads((tmp_path / f"{name}_ppl.json").read_text()) for name in ("one", "two"))
    assert two["perplexity"] == one["perplexity"] and one["perplexity"]["austen:emma"]["windows"] == 5
